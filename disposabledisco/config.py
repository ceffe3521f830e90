"""Load, default and validate the cluster config; derive the node groups from it.

Everything downstream trusts a `Config`: it only exists when the file passed the JSON
Schema in `schema.json` and the checks the schema cannot express, so every other module
can read `config[KEY]` without re-checking. Problems are reported all at once, each as one
sentence naming the JSON path, the bad value (never a secret) and what would be accepted.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import importlib.resources
import json
import math
import os
import posixpath
import re
import secrets
import shlex
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator, ValidationError

__all__ = [
    "PLACEHOLDER_AMI",
    "PLACEHOLDER_KEY_NAME",
    "SCHEMA_REF",
    "Config",
    "ConfigError",
    "GroupSpec",
    "default_config",
    "load_config",
    "load_schema",
    "parse_config",
    "reference_table",
    "schema_text",
    "usd",
]

#: The AMI written by `init`: valid in form (it is the id AWS uses in its examples) but
#: not a real image, so a fresh config is valid yet gets a warning until it is changed.
PLACEHOLDER_AMI = "ami-0123456789abcdef0"

#: The KEY_NAME written by `init`: a valid name no one gives a real key pair, warned about
#: like the AMI (a plausible name like "disposabledisco" could be real and never flagged).
PLACEHOLDER_KEY_NAME = "your-ec2-key-pair"

#: The "$schema" `init` writes: relative, so the file means the same on every machine and
#: editors (VS Code, JetBrains) resolve it next to the config once `init --schema` saved it
#: there; an absolute path into one machine's site-packages breaks with every new venv.
SCHEMA_REF = "./disposabledisco.schema.json"

#: Keys whose values must never appear in a message, a warning or a repr.
SECRET_KEYS = frozenset({"AWS_ACCESS", "AWS_SECRET"})

#: Keys that `init` leaves out: AWS keys are discouraged, SLAVE_GROUPS is an alternative
#: to NUM_SLAVES that would only confuse a fresh file.
_NOT_IN_DEFAULT = frozenset({"AWS_ACCESS", "AWS_SECRET", "SLAVE_GROUPS"})

#: Disco settings that have their own top-level key or that disposabledisco sets itself.
_MANAGED_DISCO_SETTINGS = {
    "DISCO_PORT": "set the top-level DISCO_PORT key instead",
    "DISCO_ROOT": "set the top-level DISCO_ROOT key instead",
    "DISCO_USER": "set the top-level DISCO_USER key instead",
    "DISCO_MASTER_HOST": "disposabledisco sets it to the master's name, so remove it",
}

#: TAG_KEY's default before it became required: still accepted (running clusters carry it),
#: with a warning, since any config that left TAG_KEY out shared it.
_OLD_DEFAULT_TAG_KEY = "disposabledisco"

#: A config is a few KiB; anything much larger is the wrong file (or /dev/zero).
MAX_CONFIG_BYTES = 1024 * 1024
#: No key nests more than 3 levels; this only stops runaway input long before Python's
#: recursion limit (which JSON decoding and schema validation would otherwise hit).
MAX_DEPTH = 100
#: Python refuses to convert longer integer literals (sys.get_int_max_str_digits).
_MAX_INT_DIGITS = 4300
_MAX_INT_BITS = 14_000  # about 4200 decimal digits: still printable in a message

_PRICE_KEYS = ("MAX_BID", "MAX_HOURLY_COST")
#: where EC2 calls go when no setting names a region (as boto3 would not decide at all)
FALLBACK_REGION = "us-east-1"
_MGMT_KEY_FILES = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")
_SHOW_LIMIT = 60


class ConfigError(Exception):
    """The config cannot be used; `problems` holds one sentence per problem found."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


@dataclass(frozen=True)
class GroupSpec:
    """What the config asks for one group of nodes (the master, or one slave type)."""

    role: str  # "master" | "slave"
    name: str  # "master", or the slave group's instance type (unique per config)
    instance_type: str
    count: int
    max_bid: float | None  # USD per hour; None for an on-demand master
    multiplier: int  # Disco workers per CPU core
    market: str  # "spot" | "on-demand"
    instance_types: tuple[str, ...] = ()  # the pools a fleet may choose from; () = instance_type

    @property
    def choices(self) -> tuple[str, ...]:
        """The instance types a launch may use, INSTANCE_TYPE first."""
        rest = tuple(t for t in self.instance_types if t != self.instance_type)
        return (self.instance_type, *rest)


@dataclass(frozen=True)
class Config:
    """A validated config: every schema key present, defaults applied, prices as float.

    `values` is read-only; nested lists and objects are plain JSON values that must be
    treated as read-only too.
    """

    values: Mapping[str, Any]
    path: Path | None = None
    warnings: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.values, MappingProxyType):
            object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "warnings", tuple(self.warnings))

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Like dict.get, for keys that may be absent in hand-built configs."""
        return self.values.get(key, default)

    def __repr__(self) -> str:
        shown = {k: ("<hidden>" if k in SECRET_KEYS and v is not None else v)
                 for k, v in self.values.items()}
        return f"Config(values={shown!r}, path={self.path!r}, warnings={self.warnings!r})"

    def __hash__(self) -> int:
        return hash((json.dumps(dict(self.values), sort_keys=True, default=str),
                     self.path, self.warnings))

    def __reduce__(self) -> tuple[Any, ...]:
        # mappingproxy cannot be pickled or deep-copied; rebuild from a plain dict.
        return (type(self), (dict(self.values), self.path, self.warnings))

    @property
    def tag_key(self) -> str:
        """The EC2 tag key that marks this cluster's requests and instances."""
        return self.values["TAG_KEY"]

    @property
    def master(self) -> GroupSpec:
        """The master's group: always one node."""
        market = self.values["MASTER_MARKET"]
        return GroupSpec(
            role="master",
            name="master",
            instance_type=self.values["MASTER_INSTANCE_TYPE"] or self.values["INSTANCE_TYPE"],
            count=1,
            max_bid=None if market == "on-demand" else float(self.values["MAX_BID"]),
            multiplier=int(self.values["MASTER_MULTIPLIER"]),
            market=market,
        )

    @property
    def slave_groups(self) -> tuple[GroupSpec, ...]:
        """One GroupSpec per slave instance type, in config order (counts may be 0)."""
        groups = self.values.get("SLAVE_GROUPS")
        if groups is None:
            groups = [{
                "INSTANCE_TYPE": self.values["SLAVE_INSTANCE_TYPE"] or self.values["INSTANCE_TYPE"],
                "COUNT": self.values["NUM_SLAVES"],
            }]
        return tuple(
            GroupSpec(
                role="slave",
                name=g["INSTANCE_TYPE"],
                instance_type=g["INSTANCE_TYPE"],
                count=int(g["COUNT"]),
                max_bid=float(g.get("MAX_BID", self.values["MAX_BID"])),
                multiplier=int(g.get("MULTIPLIER", self.values["SLAVE_MULTIPLIER"])),
                market="spot",
                instance_types=tuple(g.get("INSTANCE_TYPES") or ()),
            )
            for g in groups
        )

    @property
    def groups(self) -> tuple[GroupSpec, ...]:
        """The master's group followed by the slave groups."""
        return (self.master, *self.slave_groups)

    @property
    def desired_slaves(self) -> int:
        """How many slaves the config asks for in all."""
        return sum(g.count for g in self.slave_groups)

    @property
    def places(self) -> tuple[str, ...]:
        """Where a launch may go: each subnet of SUBNET_ID (a string or a list), else
        AVAILABILITY_ZONE, else "" (EC2 chooses). With a capacity pool's instance type this
        is what a parked pool is named by (see pools.py)."""
        subnets = self.values.get("SUBNET_ID")
        if subnets:
            return (subnets,) if isinstance(subnets, str) else tuple(subnets)
        return (self.values.get("AVAILABILITY_ZONE") or "",)

    @functools.cached_property
    def _named_region(self) -> str | None:
        """REGION, else AWS_REGION or AWS_DEFAULT_REGION, else the region of AWS_PROFILE (the
        config key, else the environment's profile) in ~/.aws/config; None when nothing
        names one. Decided once per Config: a profile's region costs a boto3 session (~4 ms,
        ~15 reads per pass), and one run must keep one region (its lock and its EC2 calls).
        """
        return self.values.get("REGION") or _environment_region(self.values.get("AWS_PROFILE"))

    @property
    def region(self) -> str:
        """The AWS region every EC2 call goes to, decided locally (no network)."""
        return self._named_region or FALLBACK_REGION

    @property
    def region_is_fallback(self) -> bool:
        """No setting names a region: the calls go to FALLBACK_REGION only by default."""
        return self._named_region is None

    @property
    def endpoint_url(self) -> str | None:
        """The EC2 endpoint in use when it is not AWS's: ENDPOINT_URL, else the variables
        botocore honours (AWS_ENDPOINT_URL_EC2, then AWS_ENDPOINT_URL)."""
        if self.values.get("ENDPOINT_URL"):
            return str(self.values["ENDPOINT_URL"])
        if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
            return None
        return os.environ.get("AWS_ENDPOINT_URL_EC2") or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def state_dir(self) -> Path:
        """This cluster's local folder: STATE_DIR/<TAG_KEY>@<region>[+<endpoint digest>].

        One per cluster *and* place: the same TAG_KEY in two regions (or against a local
        endpoint) is two clusters, and must not share a lock, pinned host keys or tokens.
        """
        name = f"{_safe_file_name(self.tag_key)}@{_safe_file_name(self.region)}"
        if self.endpoint_url:
            name += "+" + hashlib.sha256(self.endpoint_url.encode("utf-8")).hexdigest()[:8]
        return self.resolve_path(self.values["STATE_DIR"]) / name

    def local_upload(self, key: str) -> str | None:
        """DISCO_TARBALL or DISCO_SOURCE as written, when this DISCO_INSTALL uploads it from
        this machine (a path, not a URL); None otherwise. The one rule for both the load
        checks and the bootstrap."""
        value = self.values.get(key)
        if (self.values.get("DISCO_INSTALL") != _INSTALL_KEYS[key] or not isinstance(value, str)
                or not value or value.startswith(("https://", "s3://"))):
            return None
        return value

    @property
    def legacy_state_dir(self) -> Path:
        """Where versions before the per-region folders kept this cluster's state
        (STATE_DIR/<TAG_KEY>, shared by every region): read once, to carry pins over."""
        return self.resolve_path(self.values["STATE_DIR"]) / _safe_file_name(self.tag_key)

    def resolve_path(self, value: str) -> Path:
        """A path from the config as the user means it: ~ expanded, relative to the file.

        Relative paths are taken from the config file's folder (not the current one) so
        that a run from cron finds the same files as a run by hand.
        """
        p = Path(value).expanduser()
        if not p.is_absolute() and self.path is not None:
            p = self.path.parent / p
        return p.absolute()


def _environment_region(profile: str | None) -> str | None:
    """The region boto3 would pick without a REGION key, or None; reads only local files.
    A profile that does not exist gives None here; `load_config` refuses it."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    import boto3  # noqa: PLC0415  (slow to import; only needed without REGION)
    import botocore.exceptions  # noqa: PLC0415

    try:
        return boto3.session.Session(profile_name=profile or None).region_name or None
    except botocore.exceptions.BotoCoreError:
        return None


# --------------------------------------------------------------------------- schema


def schema_text() -> str:
    """schema.json as shipped, byte for byte (what `init --schema` saves for editors)."""
    return importlib.resources.files("disposabledisco").joinpath("schema.json").read_text(
        encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads(schema_text())


def load_schema() -> dict[str, Any]:
    """The JSON Schema shipped with the package (a copy the caller may change)."""
    return copy.deepcopy(_schema())


def _ecma_to_python(pattern: str) -> str:
    """Give `$` its JSON Schema (ECMA-262) meaning: end of string, not 'before a final \\n'.

    Python's `$` accepts "ami-12345678\\n"; a config value must not smuggle a newline.
    """
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "$":
            ch = r"\Z"
        out.append(ch)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(_ecma_to_python(pattern))


def _pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield ValidationError(f"does not match {pattern!r}")


_Validator = jsonschema.validators.extend(Draft202012Validator, {"pattern": _pattern_keyword})


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    return _Validator(_schema())


def _resolve(schema: Any) -> dict[str, Any]:
    """Follow local "$ref"s into $defs, keeping the referring schema's own keywords."""
    if not isinstance(schema, dict):
        return {}
    while "$ref" in schema:
        ref = schema["$ref"]
        prefix = "#/$defs/"
        if not ref.startswith(prefix):
            break
        target = _schema()["$defs"][ref[len(prefix):]]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


# --------------------------------------------------------------------------- wording


def _expect(schema: Any) -> str:
    """What a schema accepts, in words, to follow 'use ...' in a message."""
    s = _resolve(schema)
    if "x-hint" in s:
        return s["x-hint"]
    if "enum" in s:
        return "one of " + ", ".join(json.dumps(v) for v in s["enum"])
    if "const" in s:
        return json.dumps(s["const"])
    if "anyOf" in s:
        return " or ".join(_expect(sub) for sub in s["anyOf"])
    kind = s.get("type")
    if isinstance(kind, list):
        return " or ".join(_expect({**s, "type": k}) for k in kind)
    if kind in ("integer", "number"):
        noun = "a whole number" if kind == "integer" else "a number"
        lo, hi = s.get("minimum"), s.get("maximum")
        if "exclusiveMinimum" in s:
            return f"{noun} greater than {s['exclusiveMinimum']}"
        if lo is not None and hi is not None:
            return f"{noun} from {lo} to {hi}"
        if lo is not None:
            return f"{noun} of at least {lo}"
        if hi is not None:
            return f"{noun} of at most {hi}"
        return noun
    if kind == "boolean":
        return "true or false"
    if kind == "null":
        return "null"
    if kind == "string":
        return "a non-empty string" if s.get("minLength", 0) >= 1 else "a string"
    if kind == "array":
        return "a list" + (f" whose items are each {_expect(s['items'])}" if "items" in s else "")
    if kind == "object":
        return "an object"
    return "a valid value"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: Any) -> str:
    """The value as the user wrote it in JSON, cut short so one message stays one line."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    # Keep the line one printable line: escape line/paragraph separators and the like.
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
    if len(text) > _SHOW_LIMIT:
        text = text[: _SHOW_LIMIT - 1] + "…"
    return text


_SIMPLE_KEY = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")


def _path_str(parts: Iterable[Any]) -> str:
    """A JSON path the way a user reads it: SLAVE_GROUPS[1].COUNT."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.match(str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{json.dumps(str(part))}]" if out else json.dumps(str(part))
    return out or "the config"


def _is_secret_path(parts: tuple[Any, ...]) -> bool:
    return bool(parts) and parts[0] in SECRET_KEYS


def _sort_key(parts: tuple[Any, ...]) -> tuple[tuple[int, Any], ...]:
    return tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in parts)


def _suggest(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to a mistyped one, ignoring case (num_slaves → NUM_SLAVES)."""
    by_upper = {k.upper(): k for k in known}
    match = difflib.get_close_matches(key.upper(), list(by_upper), n=1, cutoff=0.6)
    return by_upper[match[0]] if match else None


_Problem = tuple[tuple[Any, ...], str]


def _unknown_key_problems(error: ValidationError, base: tuple[Any, ...]) -> list[_Problem]:
    schema = error.schema
    known = [k for k in schema.get("properties", {}) if k != "$schema"]
    extras = [k for k in error.instance if k not in schema.get("properties", {})]
    where = "a slave group" if base else "the config"
    problems = []
    for key in extras:
        parts = (*base, key)
        hint = _suggest(str(key), known)
        if hint:
            fix = f"did you mean {_path_str((*base, hint))}?"
        elif base:
            fix = "the keys of a slave group are " + ", ".join(known) + "."
        else:
            fix = "remove it (docs/config-reference.md lists every key)."
        problems.append((parts, f"{_path_str(parts)} is not a known key of {where}; {fix}"))
    return problems


def _condition(error: ValidationError) -> str:
    """'DISCO_INSTALL is "tarball"' for an error raised under an if/then."""
    parts = list(error.absolute_schema_path)
    if "then" not in parts:
        return ""
    node: Any = _schema()
    try:
        for part in parts[: parts.index("then")]:
            node = node[part]
        conds = [
            f"{key} is {json.dumps(sub['const'])}"
            for key, sub in node["if"].get("properties", {}).items()
            if isinstance(sub, dict) and "const" in sub
        ]
    except (KeyError, IndexError, TypeError):
        return ""
    return " and ".join(conds)


def _deeper_branch_problems(error: ValidationError) -> list[_Problem]:
    """Inside a list or object that matched an anyOf branch by type, report the branch's own
    errors (SLAVE_GROUPS[1].COUNT is missing) rather than 'SLAVE_GROUPS is not allowed'."""
    by_branch: dict[Any, list[ValidationError]] = {}
    for sub in error.context:
        by_branch.setdefault(sub.relative_schema_path[0], []).append(sub)
    depth = len(error.absolute_path)
    for subs in by_branch.values():
        wrong_type = any(s.validator == "type" and len(s.absolute_path) == depth for s in subs)
        if not wrong_type and all(len(s.absolute_path) > depth for s in subs):
            return [p for s in subs for p in _error_problems(s)]
    return []


def _error_problems(error: ValidationError) -> list[_Problem]:
    """Rewrite one jsonschema error as sentences that say where, what and how to fix."""
    base = tuple(error.absolute_path)
    kind = error.validator
    schema = error.schema if isinstance(error.schema, dict) else {}
    when = _condition(error)

    if kind == "additionalProperties" and isinstance(error.instance, dict):
        return _unknown_key_problems(error, base)

    if kind == "required" and isinstance(error.instance, dict):
        out = []
        props = schema.get("properties", {})
        for name in error.validator_value:
            if name in error.instance:
                continue
            parts = (*base, name)
            sub = props.get(name) or _schema()["properties"].get(name, {})
            if "x-missing" in sub and not base:
                out.append((parts, sub["x-missing"]))
                continue
            need = f", but it is required when {when}" if when else ""
            out.append((parts, f"{_path_str(parts)} is missing{need}; add it: {_expect(sub)}."))
        return out

    if "propertyNames" in list(error.absolute_schema_path):
        parts = (*base, error.instance)
        return [(parts, f"{_path_str(base)} has the key {_show(error.instance)}, which is not "
                        f"allowed; use {_expect(schema)}.")]

    if kind in ("anyOf", "oneOf") and error.context:
        deeper = _deeper_branch_problems(error)
        if deeper:
            return deeper

    value = error.instance
    where = _path_str(base)
    if _is_secret_path(base):
        where, shown = f"{where} (value hidden)", "not valid"
    else:
        shown = _show(value)
    if kind == "type":
        why = "" if value is None else f" ({_json_kind(value)})"
    elif kind == "minimum":
        why = f", below the minimum {error.validator_value}"
    elif kind == "maximum":
        why = f", above the maximum {error.validator_value}"
    elif kind == "exclusiveMinimum":
        why = f", but it must be greater than {error.validator_value}"
    elif kind in ("minLength", "minItems"):
        why = ", which is empty" if error.validator_value == 1 else ", which is too short"
    elif kind == "maxLength":
        why = f", longer than {error.validator_value} characters"
    elif kind == "uniqueItems":
        why = ", which has duplicate items"
    elif kind in ("pattern", "enum", "const", "anyOf", "oneOf"):
        why = ", which is not allowed"
    else:
        why = f", which fails the schema's {kind} check"
    if when:
        why += f" (it must be set when {when})"
    return [(base, f"{where} is {shown}{why}; use {_expect(schema)}.")]


# --------------------------------------------------------------------------- checks


def plural(count: int, noun: str) -> str:
    """``1 node``, ``4 nodes``: counts in plain English (next to `usd`, as both shape the
    numbers every module prints, the pure planner included)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def usd(value: float) -> str:
    """A price as people write it in the config: 0.10, 0.035, 1.50 (never 0.1)."""
    return f"{value:.2f}" if round(value, 2) == value else f"{value:.6g}"


def _is_price(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isfinite(value) and value > 0
    pattern = _schema()["$defs"]["price"]["anyOf"][0]["pattern"]
    return isinstance(value, str) and bool(_compiled(pattern).search(value))


def _non_finite(value: Any, parts: tuple[Any, ...] = ()) -> Iterator[_Problem]:
    """NaN and Infinity: Python's json accepts them, JSON does not, and they pass a schema."""
    if isinstance(value, float) and not math.isfinite(value):
        yield (parts, f"{_path_str(parts)} is {_show(value)}, which is not a JSON number; "
                      "use a finite number.")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _non_finite(v, (*parts, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _non_finite(v, (*parts, i))


#: Tag keys other owners use on instances: a cluster keyed by one of them would count, tag
#: and terminate their instances as its own. (prefix, who owns it), compared ignoring case.
#: ("aws:" is refused by TAG_KEY's pattern in schema.json, whose message wins.)
_FOREIGN_TAG_PREFIXES = (
    ("disposabledisco:", "the prefix \"disposabledisco:\" is reserved for bookkeeping tags"),
    ("kubernetes.io/", "Kubernetes owns keys under \"kubernetes.io/\""),
    ("k8s.io/", "Kubernetes owns keys under \"k8s.io/\""),
    ("karpenter.sh/", "Karpenter owns keys under \"karpenter.sh/\""),
    ("karpenter.k8s.aws/", "Karpenter owns keys under \"karpenter.k8s.aws/\""),
    ("eks:", "Amazon EKS owns keys starting \"eks:\""),
    ("alpha.eksctl.io/", "eksctl owns keys under \"alpha.eksctl.io/\""),
    ("elasticbeanstalk:", "Elastic Beanstalk owns keys starting \"elasticbeanstalk:\""),
    ("ray-", "Ray's cluster launcher owns keys starting \"ray-\""),
    ("flintrock-", "Flintrock owns keys starting \"flintrock-\""),
)


def _tag_key_owner(tag: str) -> str | None:
    """Why a TAG_KEY is someone else's (None when it may be ours)."""
    low = tag.lower()
    if low == "name":
        return "\"Name\" is the instance name tag that most instances in an account carry"
    if ".kubernetes.io/" in low or ".k8s.io/" in low:
        return "Kubernetes owns keys under \"*.kubernetes.io/\" and \"*.k8s.io/\""
    for prefix, owner in _FOREIGN_TAG_PREFIXES:
        if low.startswith(prefix):
            return owner
    return None


def _matches(key: str, value: Any) -> bool:
    """Whether a string value fits its key's schema pattern (so a cross-check makes sense)."""
    pattern = _schema()["properties"][key]["pattern"]
    return isinstance(value, str) and bool(_compiled(pattern).search(value))


def _present(data: Mapping[str, Any], key: str) -> bool:
    return data.get(key) is not None


def _launch_api_problems(data: Mapping[str, Any]) -> list[_Problem]:
    """INSTANCE_TYPES and persistent requests each need the launch API that can honour them."""
    out: list[_Problem] = []
    fleet = data.get("LAUNCH_API") == "fleet"
    if fleet and data.get("SPOT_REQUEST_TYPE") == "persistent":
        out.append((("SPOT_REQUEST_TYPE",), "SPOT_REQUEST_TYPE is \"persistent\" but LAUNCH_API "
                                            "is \"fleet\", whose instant launches are one-time; "
                                            "set SPOT_REQUEST_TYPE to \"one-time\" or LAUNCH_API "
                                            "to \"spot-requests\"."))
    groups = data.get("SLAVE_GROUPS")
    for i, g in enumerate(groups if isinstance(groups, list) else ()):
        if not isinstance(g, dict) or g.get("INSTANCE_TYPES") is None:
            continue
        parts = ("SLAVE_GROUPS", i, "INSTANCE_TYPES")
        if not fleet:
            out.append((parts, f"{_path_str(parts)} needs LAUNCH_API \"fleet\" (a spot request "
                               "asks for one type); set LAUNCH_API to \"fleet\" or remove "
                               f"{_path_str(parts)}."))
        elif isinstance(g["INSTANCE_TYPES"], list) and g.get("INSTANCE_TYPE") not in \
                g["INSTANCE_TYPES"]:
            out.append((parts, f"{_path_str(parts)} does not list the group's INSTANCE_TYPE "
                               f"{_show(g.get('INSTANCE_TYPE'))}; add it (it names the group)."))
    return out


def _semantic_problems(data: Mapping[str, Any]) -> list[_Problem]:
    """Rules that span several keys, which JSON Schema cannot say clearly."""
    out: list[_Problem] = []

    groups = data.get("SLAVE_GROUPS")
    if isinstance(groups, list):
        seen: dict[str, int] = {}
        total = 0
        for i, g in enumerate(groups):
            if not isinstance(g, dict):
                continue
            itype = g.get("INSTANCE_TYPE")
            if isinstance(itype, str):
                if itype in seen:
                    parts = ("SLAVE_GROUPS", i, "INSTANCE_TYPE")
                    out.append((parts, f"{_path_str(parts)} is {_show(itype)}, already used "
                                       f"by SLAVE_GROUPS[{seen[itype]}]; a slave group is named by "
                                       "its instance type, so merge the two into one group and "
                                       "add up their COUNT."))
                else:
                    seen[itype] = i
            count = g.get("COUNT")
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                total += count
        if total > 1000:
            out.append((("SLAVE_GROUPS",), f"SLAVE_GROUPS asks for {total} slaves in all; "
                                           "use at most 1000 in total."))
        num = data.get("NUM_SLAVES")
        if ("NUM_SLAVES" in data and isinstance(num, int) and not isinstance(num, bool)
                and 0 <= num != total):
            out.append((("NUM_SLAVES",), f"NUM_SLAVES is {_show(num)} but SLAVE_GROUPS adds up to "
                                         f"{total} slaves; SLAVE_GROUPS decides the slaves, so "
                                         f"remove NUM_SLAVES (or set it to {total})."))

    for have, lack in (("AWS_ACCESS", "AWS_SECRET"), ("AWS_SECRET", "AWS_ACCESS")):
        if _present(data, have) and not _present(data, lack):
            out.append(((lack,), f"{have} is set but {lack} is not; give both, or better remove "
                                 f"{have} and use AWS_PROFILE, the environment or an "
                                 "instance role."))

    cap, bid = data.get("MAX_HOURLY_COST"), data.get("MAX_BID", _default("MAX_BID"))
    if (data.get("MASTER_MARKET", "spot") == "spot" and _is_price(cap) and _is_price(bid)
            and float(cap) < float(bid)):
        out.append((("MAX_HOURLY_COST",), f"MAX_HOURLY_COST is {_show(cap)}, less than the "
                                          f"master's bid alone (MAX_BID {_show(bid)}); raise "
                                          "MAX_HOURLY_COST or lower MAX_BID."))

    tag = data.get("TAG_KEY")
    owner = _tag_key_owner(tag) if isinstance(tag, str) else None
    if owner:
        out.append((("TAG_KEY",), f"TAG_KEY is {_show(tag)}, but {owner}, so this cluster would "
                                  "act on instances it does not own; use a key of its own, e.g. "
                                  "\"disco-<something unique>\"."))

    region, zone = data.get("REGION"), data.get("AVAILABILITY_ZONE")
    if _matches("REGION", region) and _matches("AVAILABILITY_ZONE", zone):
        rest = zone[len(region):] if zone.startswith(region) else None
        if rest is None or not re.fullmatch(r"[a-z]|-[a-z]+-[0-9]+[a-z]", rest):
            out.append((("AVAILABILITY_ZONE",), f"AVAILABILITY_ZONE is {_show(zone)}, which is "
                                                f"not in REGION {_show(region)}; use a zone of "
                                                f"that region like {region}a."))

    out += _disco_account_problems(data)

    if data.get("IDLE_MINUTES") is not None and data.get("DISCO_INSTALL") == "none":
        out.append((("IDLE_MINUTES",), "IDLE_MINUTES is set but DISCO_INSTALL is \"none\", so "
                                       "there is no Disco on the master to ask whether jobs "
                                       "run; set IDLE_MINUTES to null or install Disco."))

    out.extend(_launch_api_problems(data))

    settings = data.get("DISCO_SETTINGS")
    if isinstance(settings, dict):
        for key in settings:
            if key in _MANAGED_DISCO_SETTINGS:
                parts = ("DISCO_SETTINGS", key)
                out.append((parts, f"{_path_str(parts)} is managed by disposabledisco; "
                                   f"{_MANAGED_DISCO_SETTINGS[key]}."))
    return out


#: Folders the bootstrap must never create, re-own or fill as DISCO_ROOT: the system's own
#: (FHS and Ubuntu) and the shared parents where every other service keeps its data.
_SYSTEM_FOLDERS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
    "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys",
    "/tmp", "/usr", "/usr/bin", "/usr/games", "/usr/include", "/usr/lib", "/usr/lib32",
    "/usr/lib64", "/usr/libexec", "/usr/local", "/usr/local/bin", "/usr/local/etc",
    "/usr/local/games", "/usr/local/include", "/usr/local/lib", "/usr/local/sbin",
    "/usr/local/share", "/usr/local/src", "/usr/sbin", "/usr/share", "/usr/src", "/var",
    "/var/backups", "/var/cache", "/var/crash", "/var/lib", "/var/local", "/var/lock",
    "/var/log", "/var/mail", "/var/opt", "/var/run", "/var/snap", "/var/spool", "/var/tmp",
    "/var/www",
})
#: Virtual or boot file systems: nothing of Disco's belongs anywhere below them.
_SYSTEM_TREES = ("/boot", "/dev", "/proc", "/run", "/sys")
#: Accounts that exist for the system or for logging in with sudo (cloud images' default
#: users): Disco jobs run as DISCO_USER, so any of them would hand jobs that account.
_SYSTEM_ACCOUNTS = frozenset({
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
    "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "sshd",
    "messagebus", "syslog", "_apt", "tss", "uuidd", "tcpdump", "landscape", "pollinate",
    "lxd", "dnsmasq", "statd", "_chrony", "chrony", "ntp", "postfix", "polkitd", "usbmux",
    "fwupd-refresh", "dhcpcd", "_rpc", "systemd-network", "systemd-resolve",
    "systemd-timesync", "systemd-coredump", "systemd-oom", "ubuntu", "ec2-user", "admin",
    "debian", "centos", "fedora", "rocky", "almalinux", "cloud-user",
})


def _disco_account_problems(data: Mapping[str, Any]) -> list[_Problem]:
    """DISCO_ROOT and DISCO_USER are created and owned on every node as root: a system
    folder or a privileged account there would give Disco jobs the system."""
    out: list[_Problem] = []
    ssh_user = data.get("SSH_USER", _default("SSH_USER"))
    root = data.get("DISCO_ROOT", _default("DISCO_ROOT"))
    if isinstance(root, str) and root.startswith("/"):
        normal = posixpath.normpath("/" + root.lstrip("/"))
        if normal in _SYSTEM_FOLDERS or any(normal == t or normal.startswith(t + "/")
                                            for t in _SYSTEM_TREES):
            out.append((("DISCO_ROOT",), f"DISCO_ROOT is {_show(root)}, a system folder that "
                                         "the nodes' bootstrap would hand to DISCO_USER; use a "
                                         "folder of Disco's own like \"/srv/disco\"."))
        if isinstance(ssh_user, str) and normal == f"/home/{ssh_user}":
            out.append((("DISCO_ROOT",), f"DISCO_ROOT is {_show(root)}, the home of SSH_USER "
                                         f"{_show(ssh_user)}; use a folder of Disco's own like "
                                         "\"/srv/disco\"."))
    user = data.get("DISCO_USER", _default("DISCO_USER"))
    if not isinstance(user, str):
        return out
    if user == ssh_user:
        out.append((("DISCO_USER",), f"DISCO_USER is {_show(user)}, the same account as "
                                     "SSH_USER, which has passwordless sudo, so every Disco job "
                                     "could become root; use an account of its own like "
                                     "\"disco\"."))
    elif user in _SYSTEM_ACCOUNTS:
        what = "root itself" if user == "root" else "a system or login account"
        out.append((("DISCO_USER",), f"DISCO_USER is {_show(user)}, {what}, and Disco runs "
                                     "every job as DISCO_USER; use an unprivileged account of "
                                     "its own like \"disco\"."))
    return out


#: Keys that only one DISCO_INSTALL reads: key -> that DISCO_INSTALL.
_INSTALL_KEYS = {
    "DISCO_TARBALL": "tarball", "DISCO_TARBALL_SHA256": "tarball",
    "DISCO_SOURCE": "source", "DISCO_SOURCE_SHA256": "source", "DISCO_APT_SOURCE": "apt",
}
#: The files a DISCO_INSTALL uploads when given as a local path: key -> what it is.
_LOCAL_UPLOADS = {"DISCO_TARBALL": "tarball", "DISCO_SOURCE": "source bundle"}


def _warnings(values: Mapping[str, Any], raw: Mapping[str, Any]) -> list[str]:
    """Things that work but are probably not what the user wants."""
    out = []
    if values["AMI"] == PLACEHOLDER_AMI:
        out.append(f"AMI is still the placeholder {PLACEHOLDER_AMI} written by init; set it to an "
                   "Ubuntu AMI of your region.")
    if values["KEY_NAME"] == PLACEHOLDER_KEY_NAME:
        out.append(f"KEY_NAME is still the placeholder {_show(PLACEHOLDER_KEY_NAME)} written by "
                   "init; set it to the name of your EC2 key pair in REGION.")
    if values["SLAVE_GROUPS"] is not None and raw.get("SLAVE_INSTANCE_TYPE") is not None:
        out.append("SLAVE_INSTANCE_TYPE is ignored because SLAVE_GROUPS gives the slaves' types; "
                   "remove it.")
    install = values["DISCO_INSTALL"]
    for key, mode in _INSTALL_KEYS.items():
        if values[key] is not None and install != mode:
            out.append(f"{key} is ignored because DISCO_INSTALL is {_show(install)}, "
                       f"not \"{mode}\".")
    if install == "apt":  # the schema requires DISCO_APT_SOURCE then
        out += _apt_source_warnings(values["DISCO_APT_SOURCE"])
    if values["TAG_KEY"] == _OLD_DEFAULT_TAG_KEY:
        out.append(f"TAG_KEY is {_show(_OLD_DEFAULT_TAG_KEY)}, the default of earlier versions "
                   "that other configs may share, and clusters sharing a TAG_KEY take each "
                   "other's nodes; keep it only if no other config in this account uses it.")
    subnets = values["SUBNET_ID"]
    if isinstance(subnets, list) and len(subnets) > 1 and values["AVAILABILITY_ZONE"]:
        out.append(f"SUBNET_ID lists {len(subnets)} subnets and AVAILABILITY_ZONE is set, so "
                   "every launch asks for that zone and EC2 refuses it in a subnet of another "
                   "zone; remove AVAILABILITY_ZONE (a subnet names its zone) unless all the "
                   "subnets are in it.")
    if values["HOST_KEY_POLICY"] == "insecure":
        out.append("HOST_KEY_POLICY is \"insecure\": SSH host keys are not checked, so use it "
                   "only for tests.")
    return out


#: apt source options that switch off signature checks (sources.list(5)).
_INSECURE_APT_OPTIONS = ("trusted", "allow-insecure", "allow-weak",
                         "allow-downgrade-to-insecure")


def _apt_source_warnings(source: str) -> list[str]:
    """An apt source that installs unsigned or unverifiable packages as root on every node."""
    match = re.match(r"deb (?:\[([^\]]*)\] )?(\S+)", source)
    if not match:
        return []
    options = dict(o.partition("=")[::2] for o in (match.group(1) or "").split())
    out = [f"DISCO_APT_SOURCE sets {name}={options[name]}, so apt installs Disco without "
           "checking its signature; remove it and use signed-by= with the repository's key."
           for name in _INSECURE_APT_OPTIONS if name in options
           and options[name].lower() in ("yes", "true", "")]
    if match.group(2).startswith("http://") and "signed-by" not in options:
        out.append("DISCO_APT_SOURCE is plain http:// without signed-by=, so any key apt "
                   "trusts can sign what the nodes install and anyone on the path can choose "
                   "which versions they get; add [signed-by=/usr/share/keyrings/KEY.gpg] or "
                   "use https://.")
    return out


def _permission_warning(path: Path, values: Mapping[str, Any]) -> str | None:
    """A config holding AWS_SECRET must not be readable by other users."""
    if values.get("AWS_SECRET") is None or os.name == "nt":
        return None
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & 0o044:
        return (f"this file holds AWS_SECRET and is readable by other users; run "
                f"`chmod 600 {shlex.quote(str(path))}` (or better, remove AWS_ACCESS/AWS_SECRET "
                "and use a profile or an instance role).")
    return None


# --------------------------------------------------------------------------- building


def _default(key: str) -> Any:
    return copy.deepcopy(_schema()["properties"][key].get("default"))


def _as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _takes_integer(prop: Any) -> bool:
    """Whether a key's schema accepts whole numbers (alone, like SSH_PORT, or beside null,
    like IDLE_MINUTES): JSON Schema takes 5.0 for an integer, the code wants 5."""
    s = _resolve(prop)
    return s.get("type") == "integer" or any(_takes_integer(b) for b in s.get("anyOf", ()))


def _normalize(data: Mapping[str, Any]) -> dict[str, Any]:
    """Every schema key present, defaults applied, prices as float, whole numbers as int."""
    props = _schema()["properties"]
    values: dict[str, Any] = {}
    for key, prop in props.items():
        if key == "$schema":
            continue  # where the editor found the schema is not part of the cluster
        values[key] = copy.deepcopy(data[key]) if key in data else copy.deepcopy(
            prop.get("default")
        )
        if _takes_integer(prop):
            values[key] = _as_int(values[key])
    for key in _PRICE_KEYS:
        if values[key] is not None:
            values[key] = float(values[key])
    if isinstance(values["MGMT_KEY"], str):
        values["MGMT_KEY"] = values["MGMT_KEY"].strip()
    if values["SLAVE_GROUPS"] is not None:
        groups = []
        for g in values["SLAVE_GROUPS"]:
            groups.append({
                "INSTANCE_TYPE": g["INSTANCE_TYPE"],
                "COUNT": _as_int(g["COUNT"]),
                "MAX_BID": float(g.get("MAX_BID", values["MAX_BID"])),
                "MULTIPLIER": _as_int(g.get("MULTIPLIER", values["SLAVE_MULTIPLIER"])),
                **({"INSTANCE_TYPES": list(g["INSTANCE_TYPES"])} if "INSTANCE_TYPES" in g else {}),
            })
        values["SLAVE_GROUPS"] = groups
        values["NUM_SLAVES"] = sum(g["COUNT"] for g in groups)
    return values


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "<hidden>")
    return text


def _unreadable(data: Any) -> Iterator[_Problem]:
    """Values no later step may see: nesting too deep to walk, integers too long to print,
    strings that are not text (a lone surrogate cannot be encoded, so a node script built
    from it would crash). Walked without recursion, whatever the depth."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while stack:
        parts, value = stack.pop()
        if len(parts) > MAX_DEPTH:
            yield (parts[:1], f"{_path_str(parts[:1])} nests lists or objects more than "
                              f"{MAX_DEPTH} levels deep; no key needs more than 3.")
            continue
        if isinstance(value, _HugeInteger) or (isinstance(value, int)
                                                and value.bit_length() > _MAX_INT_BITS):
            digits = value.digits if isinstance(value, _HugeInteger) else "thousands of"
            yield (parts, f"{_path_str(parts)} is a whole number of {digits} digits, far beyond "
                          f"any key's range; use {_expect_at(parts)}.")
        elif isinstance(value, str) and not _is_text(value):
            yield (parts, f"{_path_str(parts)} contains a lone surrogate (half of a \\u "
                          "escape pair), which is not a character; write the character itself.")
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and not _is_text(key):
                    yield (parts, f"{_path_str(parts)} has a key with a lone surrogate (half of "
                                  "a \\u escape pair), which is not a character; fix the key.")
                stack.append(((*parts, key), item))
        elif isinstance(value, list):
            stack.extend(((*parts, i), item) for i, item in enumerate(value))


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _expect_at(parts: tuple[Any, ...]) -> str:
    """What the schema accepts at a top-level key, for messages about values under it."""
    prop = _schema()["properties"].get(parts[0]) if len(parts) == 1 else None
    return _expect(prop) if prop else "a value docs/config-reference.md allows"


def _config_error(problems: list[_Problem], where: str, secrets: list[str]) -> ConfigError:
    """One sentence per field (the first found is enough to fix it), sorted by path."""
    first: dict[tuple[Any, ...], str] = {}
    for parts, msg in problems:
        first.setdefault(parts, msg)
    ordered = sorted(first.items(), key=lambda p: _sort_key(p[0]))
    return ConfigError([_redact(where + msg, secrets) for _, msg in ordered])


def _build(data: Any, path: Path | None, early: list[_Problem]) -> Config:
    where = f"{path}: " if path is not None else ""
    broken = list(_unreadable(data))
    if broken:  # before anything else looks at the data
        raise _config_error(broken, where, [])
    if not isinstance(data, dict):
        raise ConfigError([f"{where}the config must be a JSON object like {{\"AMI\": ..., "
                           f"\"KEY_NAME\": ...}} at the top level, not {_json_kind(data)}."])
    problems: list[_Problem] = list(early)
    problems += list(_non_finite(data))
    for error in _validator().iter_errors(data):
        problems += _error_problems(error)
    problems += _semantic_problems(data)  # after the schema's, which win on the same path
    secrets = [data[k] for k in SECRET_KEYS if isinstance(data.get(k), str)]
    if problems:
        raise _config_error(problems, where, secrets)
    values = _normalize(data)
    warnings = _warnings(values, data)
    if path is not None:
        perm = _permission_warning(path, values)
        if perm:
            warnings.append(perm)
    return Config(values=values, path=path,
                  warnings=tuple(_redact(where + w, secrets) for w in warnings))


def parse_config(data: Any, path: str | os.PathLike[str] | None = None) -> Config:
    """Validate already-parsed JSON data; `path` only names the file in messages.

    Raises ConfigError listing every problem at once, so one edit can fix them all.
    """
    return _build(data, Path(path) if path is not None else None, [])


def _read_config_text(p: Path) -> str:
    """The file's text, read only from a regular file and at most MAX_CONFIG_BYTES, so a
    FIFO, a device like /dev/zero or a runaway file can neither hang nor exhaust memory."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError([f"config file {p} does not exist; create one with "
                           f"`disposabledisco init > {p}`."]) from None
    except OSError as e:
        raise ConfigError([f"cannot read config file {p}: {e.strerror or e}."]) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError([f"config file {p} is a folder, not a file."])
        if not stat.S_ISREG(mode):
            raise ConfigError([f"config file {p} is {_file_kind(mode)}, not a regular file; "
                               "give the path of a JSON file."])
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError([f"cannot read config file {p}: {e.strerror or e}."]) from None
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([f"config file {p} is larger than {MAX_CONFIG_BYTES // 1024} KiB, "
                           "far more than any config needs; give the right file."])
    try:
        return b"".join(chunks).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError([f"config file {p} is not UTF-8 text (bad byte at offset "
                           f"{e.start}); save it as UTF-8."]) from None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


class _HugeInteger:
    """An integer literal too long for Python to convert: kept as text to be reported."""

    def __init__(self, digits: str) -> None:
        self.digits = len(digits.lstrip("-"))


def _parse_int(text: str) -> int | _HugeInteger:
    return _HugeInteger(text) if len(text) > _MAX_INT_DIGITS else int(text)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; any failure is a ConfigError, never a traceback."""
    p = Path(path)
    text = _read_config_text(p)
    if not text.strip():
        raise ConfigError([f"config file {p} is empty; create one with "
                           f"`disposabledisco init > {p}`."])

    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj and key not in duplicates:
                duplicates.append(key)
            obj[key] = value
        return obj

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise ConfigError([f"{p} is not valid JSON: {e.msg} at line {e.lineno}, column "
                           f"{e.colno}."]) from None
    except RecursionError:
        raise ConfigError([f"{p}: the config nests lists or objects more than "
                           f"{MAX_DEPTH} levels deep; no key needs more than 3."]) from None
    early: list[_Problem] = [
        ((key,), f"{_show(key)} appears more than once in one JSON object, and only the "
                 "last one counts; keep just one.")
        for key in duplicates
    ]
    config = _build(data, p, early)
    local = _local_problems(config)
    if local:
        raise ConfigError([f"{p}: {msg}" for msg in local])
    return config


#: Linux limits: a path and one name in it. The cluster's folder holds names up to about
#: 50 characters (hostkeys/.<instance id>.<random>.tmp), kept free below.
_PATH_MAX = 4096
_NAME_MAX = 255
_INNER_NAMES = 64


def _local_problems(config: Config) -> list[str]:
    """What only this machine can tell: paths in the config that `up` would trip over
    after it started (a STATE_DIR that is a file or cannot be made, a tarball that is a
    folder), and a named AWS profile that does not exist. One sentence each."""
    out = []
    paths = {"STATE_DIR": config["STATE_DIR"], "SSH_KEY_FILE": config["SSH_KEY_FILE"]}
    for key in _LOCAL_UPLOADS:
        if (value := config.local_upload(key)) is not None:
            paths[key] = value
    for key, value in list(paths.items()):
        if isinstance(value, str) and value.startswith("~") and _home_missing(value):
            user = value[1:].split("/", 1)[0]
            out.append(f"{key} is {_show(value)}, but there is no user {_show(user)} whose "
                       f"home ~{user} could stand for; use ~/... or an absolute path.")
            del paths[key]
    if "STATE_DIR" in paths:
        out += _state_dir_problems(config)
    for key in _LOCAL_UPLOADS:
        if key in paths:
            out += _upload_problems(key, config.resolve_path(paths[key]),
                                    config[f"{key}_SHA256"])
    profile = config["AWS_PROFILE"]
    if profile and not _profile_exists(profile):
        out.append(f"AWS_PROFILE is {_show(profile)}, which is not a profile in the AWS config "
                   "or credentials files; add it (`aws configure --profile NAME`) or fix "
                   "the name.")
    return out


def _home_missing(value: str) -> bool:
    try:
        Path(value).expanduser()
    except RuntimeError:  # "Could not determine home directory"
        return True
    return False


def _state_dir_problems(config: Config) -> list[str]:
    from .statefiles import StateFileError, check_dir  # noqa: PLC0415  (it imports this module)

    shown = _show(config["STATE_DIR"])
    folder = config.state_dir
    if len(str(folder)) + _INNER_NAMES > _PATH_MAX or any(
            len(part.encode("utf-8", "surrogateescape")) > _NAME_MAX for part in folder.parts):
        return [f"STATE_DIR is {shown}, which with the cluster's folder makes a path too long "
                f"for this system ({len(str(folder))} characters); use a shorter path."]
    chain = (folder, *folder.parents)
    at = next(i for i, p in enumerate(chain) if os.path.lexists(p))
    if at:
        existing, first_missing = chain[at], chain[at - 1]
        if not existing.is_dir():
            return [f"STATE_DIR is {shown}, but {existing} is not a folder; move it "
                    "away or set STATE_DIR to a folder."]
        try:  # the only sure test: root passes os.access where mkdir fails (/proc, a full disk)
            os.mkdir(first_missing, 0o700)
        except FileExistsError:
            return []  # another run just made it; `up` checks it like any existing folder
        except OSError as error:
            return [f"STATE_DIR is {shown}, which cannot be created in {existing} "
                    f"({error.strerror or error}); set STATE_DIR to a folder you can write to."]
        with contextlib.suppress(OSError):  # not empty: a concurrent run uses it now
            os.rmdir(first_missing)
        return []
    try:
        check_dir(folder)
    except StateFileError as error:
        return error.problems
    return []


def _upload_problems(key: str, path: Path, sha256: str | None) -> list[str]:
    """A local DISCO_TARBALL or DISCO_SOURCE (`key`) must be a readable regular file (a
    folder, a FIFO or a file that cannot be read would only fail once nodes are being
    bootstrapped), with the `key`_SHA256 the config pins, if any."""
    what = _LOCAL_UPLOADS[key]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return [f"{key} {path} does not exist; give the path of a Disco {what} file, "
                "or an https:// or s3:// URL."]
    except OSError as error:
        return [f"{key} {path} cannot be read ({error.strerror or error}); fix its "
                "permissions or give another file."]
    digest = hashlib.sha256()
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            return [f"{key} {path} is a folder, not a {what}; give the .tar.gz file."]
        if not stat.S_ISREG(mode):
            return [f"{key} {path} is {_file_kind(mode)}, not a regular file; give a "
                    f"{what} file."]
        if sha256 is None:
            return []
        for block in iter(lambda: os.read(fd, 1 << 20), b""):
            digest.update(block)
    except OSError as error:
        return [f"{key} {path} cannot be read ({error.strerror or error}); fix its "
                "permissions or give another file."]
    finally:
        os.close(fd)
    if digest.hexdigest() != sha256.lower():
        return [f"{key}_SHA256 is {sha256.lower()}, but {path} has sha256 "
                f"{digest.hexdigest()}; give the {what} you meant, or update {key}_SHA256."]
    return []


def _profile_exists(profile: str) -> bool:
    import botocore.session  # noqa: PLC0415  (slow to import; only needed with AWS_PROFILE)

    return profile in botocore.session.Session().available_profiles


def _read_mgmt_key() -> str:
    """The user's own public key, so a fresh config lets them log in to the nodes."""
    pattern = _compiled(_schema()["properties"]["MGMT_KEY"]["pattern"])
    for name in _MGMT_KEY_FILES:
        try:
            text = (Path.home() / ".ssh" / name).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text and pattern.search(text):
            return text
    return ""


def default_config() -> dict[str, Any]:
    """A complete, valid config with the defaults, for `init` to print as a starting point."""
    cfg: dict[str, Any] = {"$schema": SCHEMA_REF}
    for key, prop in _schema()["properties"].items():
        if key == "$schema" or key in _NOT_IN_DEFAULT:
            continue
        if key == "AMI":
            cfg[key] = PLACEHOLDER_AMI
        elif key == "KEY_NAME":
            cfg[key] = PLACEHOLDER_KEY_NAME
        elif key == "TAG_KEY":
            cfg[key] = f"disco-{secrets.token_hex(4)}"  # the identity no other config shares
        elif key == "MGMT_KEY":
            cfg[key] = _read_mgmt_key()
        elif key == "DISCO_INSTALL":
            # a new cluster builds Disco itself; the schema default stays "preinstalled"
            # because configs written before "source" existed meant that by leaving it out
            cfg[key] = "source"
        else:
            cfg[key] = copy.deepcopy(prop.get("default"))
    return cfg


# --------------------------------------------------------------------------- docs


def _type_text(schema: Any) -> str:
    s = _resolve(schema)
    if "enum" in s:
        return ", ".join(f"`{json.dumps(v)}`" for v in s["enum"])
    if "anyOf" in s:
        return " or ".join(dict.fromkeys(_type_text(sub) for sub in s["anyOf"]))
    kind = s.get("type")
    if isinstance(kind, list):
        return " or ".join(_type_text({**s, "type": k}) for k in kind)
    if kind == "integer":
        lo, hi = s.get("minimum"), s.get("maximum")
        if lo is not None and hi is not None:
            return f"integer {lo}–{hi}"
        return f"integer ≥ {lo}" if lo is not None else "integer"
    if kind == "array":
        items = _resolve(s.get("items", {}))
        return f"list of {items.get('type', 'value')}s" if "type" in items else "list"
    return str(kind or "any")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_table() -> str:
    """The Markdown reference of every key, generated from schema.json so docs cannot drift.

    `python -m disposabledisco.config > docs/config-reference.md` regenerates the page.
    """
    schema = _schema()
    rows = []

    def add(key: str, prop: dict[str, Any], required: bool) -> None:
        if required:
            default = "required"
        elif "default" in prop:
            default = f"`{json.dumps(prop['default'])}`"
        else:
            default = "—"
        rows.append(f"| `{key}` | {_cell(_type_text(prop))} | {_cell(default)} | "
                    f"{_cell(prop.get('description', ''))} |")

    for key, prop in schema["properties"].items():
        add(key, prop, key in schema.get("required", []))
        if key == "SLAVE_GROUPS":
            group = schema["$defs"]["slaveGroup"]
            for sub, sprop in group["properties"].items():
                add(f"SLAVE_GROUPS[].{sub}", sprop, sub in group["required"])
    return "\n".join([
        "# Config reference",
        "",
        "Generated from `disposabledisco/schema.json` by "
        "`python -m disposabledisco.config > docs/config-reference.md`; do not edit by hand.",
        "Prices are USD per hour, as a string like `\"0.10\"` or a number.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ])


def _safe_file_name(name: str) -> str:
    """A tag key as one folder name; altered names get a hash so two keys never collide."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    if safe == name:
        return safe
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"{safe or '_'}-{digest}"


if __name__ == "__main__":
    print(reference_table(), end="")
