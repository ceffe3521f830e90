"""A local EC2 endpoint: moto's server on loopback, reachable by boto3 over real HTTP.

The project's EC2 gateway is exercised end to end (request signing, XML parsing, retries)
against :class:`LocalEc2`; a :class:`~disposabledisco.sandbox.market.SpotMarket` can be
installed on it to give spot requests their real life cycle.
"""

from __future__ import annotations

import io
import threading
import urllib.request
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import boto3
from botocore.config import Config
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import WSGIRequestHandler, make_server

from .pricelist import PRICING_TARGET, pricing_reply

if TYPE_CHECKING:
    from .market import SpotMarket

HttpReply = tuple[int, list[tuple[str, str]], bytes]
HttpHook = Callable[[str | None], HttpReply | None]

DUMMY_KEY_ID = "testing"
DUMMY_SECRET = "testing"
_STATUS_TEXT = {200: "OK", 503: "Service Unavailable", 500: "Internal Server Error",
                400: "Bad Request"}


class _QuietHandler(WSGIRequestHandler):
    """werkzeug logs every request to stderr; tests and the sandbox do not want that."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Gate:
    """WSGI middleware that shows each request's EC2 Action to the installed hooks.

    Every hook sees every call; the first one to return a reply answers instead of moto
    (throttling). The body is buffered so moto can still read it. Price List calls
    (X-Amz-Target ``AWSPriceListService.*``, action ``GetProducts``) are answered here from
    the installed market's on-demand prices (:mod:`.pricelist`).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.hooks: dict[str, HttpHook] = {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        pricing = target.startswith(PRICING_TARGET)
        hooks = list(self.hooks.values())
        if hooks:
            action = target.removeprefix(PRICING_TARGET) if pricing else self._action(environ)
            replies = [hook(action) for hook in hooks]
            reply = next((r for r in replies if r is not None), None)
            if reply is not None:
                return _reply(start_response, reply)
        if pricing:  # moto has no Price List API: answered here
            return _reply(start_response, pricing_reply(target, _body(environ)))
        return self.app(environ, start_response)  # type: ignore[no-any-return]

    @staticmethod
    def _action(environ: dict[str, Any]) -> str | None:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if "Action" in query:
            return query["Action"][0]
        if environ.get("REQUEST_METHOD") != "POST":
            return None
        form = parse_qs(_body(environ).decode("utf-8", "replace"))
        return form["Action"][0] if "Action" in form else None


def _body(environ: dict[str, Any]) -> bytes:
    """The request body, read once and put back for whoever reads it next (moto)."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(body)
    return body


def _reply(start_response: Any, reply: HttpReply) -> list[bytes]:
    status, headers, body = reply
    text = _STATUS_TEXT.get(status, "Error")
    start_response(f"{status} {text}", [*headers, ("Content-Length", str(len(body)))])
    return [body]


class _Server(ThreadedMotoServer):
    """moto's threaded server with the gate in front and request logging off."""

    def __init__(self, port: int) -> None:
        super().__init__(ip_address="127.0.0.1", port=port, verbose=False)
        self.gate = _Gate(DomainDispatcherApplication(create_backend_app))

    def _server_entry(self) -> None:
        self._server = make_server(self._ip_address, self._port, self.gate, threaded=True,
                                   request_handler=_QuietHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


class LocalEc2:
    """moto's EC2 served on 127.0.0.1 (never all interfaces), as a context manager.

    ``market``, when given, is installed on start and uninstalled on stop.
    """

    def __init__(self, region: str = "us-east-1", *, port: int = 0,
                 market: SpotMarket | None = None) -> None:
        if market is not None and market.region != region:
            raise ValueError(f"market models {market.region}, endpoint serves {region}")
        self.region = region
        self.market = market
        self._client: Any = None
        self._client_url = ""
        self._port = port
        self._server: _Server | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LocalEc2:
        """Start the server thread; idempotent."""
        with self._lock:
            if self._server is None:
                server = _Server(self._port)
                server.start()
                self._server = server
        if self.market is not None:
            self.market.install(self)
        return self

    def stop(self) -> None:
        """Uninstall the market (if ours) and shut the server down."""
        if self.market is not None:
            self.market.uninstall()
        with self._lock:
            if self._server is not None:
                self._server.stop()
                self._server = None

    def __enter__(self) -> LocalEc2:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The endpoint URL to give boto3 (``endpoint_url`` / ``AWS_ENDPOINT_URL_EC2``)."""
        if self._server is None:
            raise RuntimeError("LocalEc2 is not started")
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def set_http_hook(self, hook: HttpHook | None, slot: str = "default") -> None:
        """Show every HTTP call's Action to ``hook(action)``; ``None`` empties the slot.

        A hook returning ``(status, headers, body)`` answers instead of moto. Hooks in
        different slots (the market uses ``"spot-market"``) coexist and all see each call.
        """
        if self._server is None:
            raise RuntimeError("LocalEc2 is not started")
        if hook is None:
            self._server.gate.hooks.pop(slot, None)
        else:
            self._server.gate.hooks[slot] = hook

    def reset(self) -> None:
        """Clear all moto state (POST /moto-api/reset) and the market's moto-bound state."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", data=b"",
                                         method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
        if self.market is not None:
            self.market.reset()

    # ------------------------------------------------------------------ clients
    def client(self, *, config: Config | None = None, **kwargs: Any) -> Any:
        """A boto3 EC2 client for this endpoint with dummy credentials.

        Credentials and region are explicit, so botocore never asks an instance metadata
        service (the effect of ``AWS_EC2_METADATA_DISABLED=true``).
        """
        plain = config is None and not kwargs
        if plain and self._client is not None and self._client_url == self.url:
            return self._client
        session = boto3.session.Session(
            aws_access_key_id=DUMMY_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET,
            region_name=self.region,
        )
        made = session.client("ec2", endpoint_url=self.url, config=config, **kwargs)
        if plain:  # boto3 clients are thread-safe: share the plain one
            self._client, self._client_url = made, self.url
        return made

    def setup_loopback_network(
        self,
        cidr: str = "127.10.0.0/16",
        subnet: str = "127.10.0.0/24",
        *,
        public_key: str | None = None,
        key_name: str = "disposabledisco-sandbox",
        group_name: str = "disposabledisco-sandbox",
    ) -> dict[str, str]:
        """Create a VPC and subnet inside 127/8 so instances get loopback private IPs
        (.4, .5, … in launch order) that real sshd processes can serve.

        Returns ``vpc_id``, ``subnet_id``, ``security_group_id``, ``key_name``,
        ``image_id`` and, when no ``public_key`` was given and moto made the key pair,
        ``private_key``.
        """
        ec2 = self.client()
        vpc_id = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
        subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock=subnet)["Subnet"]["SubnetId"]
        group_id = ec2.create_security_group(
            GroupName=group_name, Description="disposabledisco sandbox", VpcId=vpc_id
        )["GroupId"]
        ec2.authorize_security_group_ingress(
            GroupId=group_id,
            IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": cidr}]},
                           {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                            "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
        )
        result = {"vpc_id": vpc_id, "subnet_id": subnet_id, "security_group_id": group_id,
                  "key_name": key_name}
        existing = ec2.describe_key_pairs(
            Filters=[{"Name": "key-name", "Values": [key_name]}])["KeyPairs"]
        if existing:
            ec2.delete_key_pair(KeyName=key_name)
        if public_key is not None:
            ec2.import_key_pair(KeyName=key_name, PublicKeyMaterial=public_key.encode())
        else:
            result["private_key"] = ec2.create_key_pair(KeyName=key_name)["KeyMaterial"]
        result["image_id"] = self._image_id(ec2)
        return result

    @staticmethod
    def _image_id(ec2: Any) -> str:
        """An AMI moto knows: one of the Ubuntu images it ships, else one we register."""
        images = ec2.describe_images(
            Filters=[{"Name": "name", "Values": ["ubuntu/images/*"]}])["Images"]
        if not images:
            images = ec2.describe_images()["Images"]
        if images:
            return str(sorted(images, key=lambda i: (i.get("Name", ""), i["ImageId"]))[-1]
                       ["ImageId"])
        made = ec2.register_image(Name="disposabledisco-sandbox", RootDeviceName="/dev/sda1",
                                  Architecture="x86_64", VirtualizationType="hvm")
        return str(made["ImageId"])
