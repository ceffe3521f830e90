"""README's IAM policy lists exactly the EC2 actions `ec2.py` calls, scoped where it says.

The actions are read from the gateway's source (AST): every `self.client.<op>(...)` call,
and every operation name that reaches `self.client.get_paginator(...)`, either literally or
through a helper's parameter (`self._paged("describe_instances", ...)`). A new EC2 call
without a README update, or a README action the code no longer uses, fails here.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import botocore.session
from botocore import xform_name

from disposabledisco import disco
from disposabledisco.config import load_schema

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
GATEWAY = REPO / "disposabledisco" / "ec2.py"
SCOPED = {"ec2:TerminateInstances", "ec2:DeleteTags", "ec2:GetConsoleOutput"}
OUR_ROLES = {"aws:ResourceTag/YOUR_TAG_KEY": ["master", "slave"]}


def _is_client(node: ast.AST) -> bool:
    """`self.client`"""
    return (isinstance(node, ast.Attribute) and node.attr == "client"
            and isinstance(node.value, ast.Name) and node.value.id == "self")


def called_operations(source: str) -> set[str]:
    """Snake-case EC2 operations the source calls through `self.client`."""
    tree = ast.parse(source)
    direct: set[str] = set()
    via_param: dict[str, int] = {}  # helper method → index of the parameter it pages with
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        params = [a.arg for a in function.args.args]
        for call in ast.walk(function):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and _is_client(call.func.value)):
                continue
            if call.func.attr != "get_paginator":
                direct.add(call.func.attr)
            elif isinstance(call.args[0], ast.Constant):
                direct.add(call.args[0].value)
            elif isinstance(call.args[0], ast.Name) and call.args[0].id in params:
                via_param[function.name] = params.index(call.args[0].id) - 1  # minus self
    for call in ast.walk(tree):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr in via_param):
            argument = call.args[via_param[call.func.attr]]
            assert isinstance(argument, ast.Constant), ast.unparse(call)
            direct.add(argument.value)
    return direct


def api_name(operation: str) -> str:
    """The CamelCase API name of a boto3 method name, from botocore's EC2 model."""
    model = botocore.session.get_session().get_service_model("ec2")
    names = {xform_name(name): name for name in model.operation_names}
    return names[operation]


def readme_policy() -> dict:
    section = README.split("<!-- iam-policy:begin -->\n")[1].split(
        "<!-- iam-policy:end -->")[0]
    return json.loads(section.strip().removeprefix("```json").removesuffix("```"))


def actions(statement: dict) -> list[str]:
    found = statement["Action"]
    return [found] if isinstance(found, str) else list(found)


def test_the_gateway_calls_these_operations():
    """The AST reader itself: a reader that found nothing would make the next test vacuous."""
    found = called_operations(GATEWAY.read_text(encoding="utf-8"))
    assert {"describe_instances", "describe_spot_instance_requests", "terminate_instances",
            "cancel_spot_instance_requests"} <= found
    assert "get_paginator" not in found
    sample = ("class G:\n def _p(self, op):\n  self.client.get_paginator(op)\n"
              " def a(self):\n  self._p('describe_x')\n  self.client.get_paginator('list_y')\n"
              "  self.client.run_z(A=1)\n  other.client.not_this()\n")
    assert called_operations(sample) == {"describe_x", "list_y", "run_z"}


def test_readme_policy_lists_exactly_the_ec2_actions_the_code_calls():
    called = {f"ec2:{api_name(op)}" for op in
              called_operations(GATEWAY.read_text(encoding="utf-8"))}
    listed = [a for s in readme_policy()["Statement"] for a in actions(s)]
    assert len(listed) == len(set(listed)), "an action is listed twice"
    assert set(listed) == called


def test_no_wildcard_actions_and_no_iam_in_the_base_policy():
    for statement in readme_policy()["Statement"]:
        assert statement["Effect"] == "Allow"
        for action in actions(statement):
            assert "*" not in action and action.startswith("ec2:"), action


def test_destructive_actions_are_scoped_to_our_roles():
    statements = readme_policy()["Statement"]
    for statement in statements:
        if set(actions(statement)) & SCOPED:
            assert set(actions(statement)) <= SCOPED, "keep scoped actions apart"
            assert statement["Resource"] == "arn:aws:ec2:*:*:instance/*"
            assert statement["Condition"]["StringEquals"] == OUR_ROLES
    untag = next(s for s in statements if "ec2:DeleteTags" in actions(s))
    assert untag["Condition"]["ForAllValues:StringLike"] == {
        "aws:TagKeys": ["disposabledisco:*"]}
    tag = next(s for s in statements if "ec2:CreateTags" in actions(s))
    assert tag["Condition"] == {"ForAllValues:StringLike": {
        "aws:TagKeys": ["YOUR_TAG_KEY", "disposabledisco:*"]}}
    cancel = next(s for s in statements if "ec2:CancelSpotInstanceRequests" in actions(s))
    assert "Condition" not in cancel  # AWS offers no resource-level scope for it


def test_pass_role_is_documented_only_for_an_instance_profile():
    assert "iam:PassRole" not in json.dumps(readme_policy())
    snippet = README.split("Only with `IAM_INSTANCE_PROFILE`")[1].split("```json")[1].split(
        "```")[0]
    statement = json.loads(snippet)
    assert statement["Action"] == "iam:PassRole"
    assert statement["Condition"] == {"StringEquals": {"iam:PassedToService":
                                                       "ec2.amazonaws.com"}}
    assert "*" not in statement["Resource"]


def test_readme_ports_are_the_ones_the_tool_configures():
    section = README.split("## Ports, and Disco's HTTP API")[1].split("\n## ")[0]
    low, high = disco.ERLANG_DIST_PORTS
    rows = {re.split(r"\s*\|\s*", line)[2] for line in section.splitlines()
            if line.startswith("| the ")}
    port = load_schema()["properties"]["DISCO_PORT"]["default"]
    assert rows == {"22", "4369", f"{low}-{high}", f"{port} (`DISCO_PORT`)", "8990"}
    assert "runs jobs without any authentication" in section
    assert "never open it to the world" in section.lower()
