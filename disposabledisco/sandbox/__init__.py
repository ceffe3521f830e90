"""Local stand-ins for EC2 and for instances: the spot market model, SSH nodes, the sandbox."""
