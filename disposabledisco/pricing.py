"""On-demand prices from the AWS Price List API, for `status`'s "against on-demand" line.

The Price List API (service `pricing`, action GetProducts) answers in us-east-1 for every
region. Its answers change a few times a month, so each one is cached in the cluster's
STATE_DIR for a day: a repeated `status` makes no pricing call. A call that fails (denied,
no network, an unreadable answer) never fails `status`: the price is "unknown" with a
reason of a few words, and that verdict is kept for a quarter of an hour so a machine
without access does not wait on every `status`.

Against a local endpoint (ENDPOINT_URL, AWS_ENDPOINT_URL_EC2 or AWS_ENDPOINT_URL) the
pricing calls go to that same endpoint, or to AWS_ENDPOINT_URL_PRICING when it is set:
a sandbox never asks AWS.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from . import statefiles
from .config import Config
from .ec2 import make_session

#: where the Price List API answers (it also does in eu-central-1 and ap-south-1)
API_REGION = "us-east-1"
CACHE_FILE = "on-demand-prices.json"
FRESH_SECONDS = 24 * 3600
FAILURE_SECONDS = 15 * 60
#: the product a Linux spot node competes with: shared tenancy, no licensed software,
#: a normal (not reserved-capacity) instance
PRODUCT_TERMS = {"operatingSystem": "Linux", "tenancy": "Shared", "preInstalledSw": "NA",
                 "capacitystatus": "Used"}


@dataclass(frozen=True)
class OnDemand:
    """What the Price List API said per instance type: a price (USD/hour), or why not."""

    prices: Mapping[str, float] = field(default_factory=dict)
    unknown: Mapping[str, str] = field(default_factory=dict)  # instance type -> reason

    def reason(self, instance_types: Iterable[str]) -> str | None:
        """Why some of these types have no price (the first reason), or None."""
        return next((self.unknown[t] for t in sorted(set(instance_types))
                     if t in self.unknown), None)


def product_filters(instance_type: str, region: str) -> list[dict[str, str]]:
    """GetProducts filters for the on-demand Linux price of one type in one region."""
    terms = {"instanceType": instance_type, "regionCode": region, **PRODUCT_TERMS}
    return [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in terms.items()]


def hourly_usd(price_list: Iterable[str]) -> float | None:
    """The on-demand USD/hour in a GetProducts PriceList (one JSON document per product),
    or None when no product has an hourly USD price.

    Several products with different prices (the filters were not narrow enough) give the
    lowest, so the saving shown is never overstated. A document that is not the documented
    shape raises ValueError.
    """
    found: list[float] = []
    for document in price_list:
        product = json.loads(document)
        for term in product["terms"].get("OnDemand", {}).values():
            for dimension in term["priceDimensions"].values():
                usd = dimension.get("pricePerUnit", {}).get("USD")
                if dimension.get("unit") == "Hrs" and usd is not None and float(usd) > 0:
                    found.append(float(usd))
    return min(found) if found else None


def pricing_endpoint(config: Config) -> str | None:
    """Where to ask: AWS_ENDPOINT_URL_PRICING, else the config's local endpoint, else AWS
    (None)."""
    if not config.endpoint_url:
        return None  # botocore still honours AWS_ENDPOINT_URL_PRICING on its own
    return os.environ.get("AWS_ENDPOINT_URL_PRICING") or config.endpoint_url


def make_pricing_client(config: Config) -> Any:
    """A Price List client: short timeouts and one retry, since `status` waits on it."""
    settings = BotoConfig(connect_timeout=3, read_timeout=10,
                          retries={"max_attempts": 2, "mode": "standard"},
                          user_agent_extra="disposabledisco")
    kwargs: dict[str, Any] = {"region_name": API_REGION, "config": settings}
    endpoint = pricing_endpoint(config)
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    return make_session(config).client("pricing", **kwargs)


def failure_reason(error: Exception) -> str:
    """A failed pricing call in a few words."""
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "error")
        if code in ("AccessDeniedException", "AccessDenied", "UnauthorizedOperation"):
            return "pricing:GetProducts denied"
        return f"pricing API said {code}"
    if isinstance(error, NoCredentialsError):
        return "no AWS credentials"
    if isinstance(error, EndpointConnectionError):
        return "pricing API unreachable"
    if isinstance(error, ValueError | KeyError | TypeError | AttributeError):
        return "unreadable pricing answer"
    return f"pricing call failed ({type(error).__name__})"


def on_demand_prices(config: Config, instance_types: Iterable[str], client: Any = None,
                     now: float | None = None) -> OnDemand:
    """The on-demand price of each type in the config's region: from the cache when it is
    fresh, else one GetProducts call per type (none for no type; after a failed call, the
    other types share its verdict without a call). Never raises for a pricing failure;
    the reason is in `OnDemand.unknown`."""
    moment = time.time() if now is None else now
    cache = _read_cache(config)
    prices: dict[str, float] = {}
    unknown: dict[str, str] = {}
    changed = False
    failure: dict[str, Any] | None = None  # a failed call this run: not asked again
    for instance_type in sorted(set(instance_types)):
        entry = cache.get(instance_type)
        if not _fresh(entry, moment):
            if client is None:
                client = _Lazy(config)
            entry = failure or _ask(client, instance_type, config.region, moment)
            failure = entry if entry.get("failed") else failure
            cache[instance_type] = entry
            changed = True
        if entry.get("usd") is not None:
            prices[instance_type] = float(entry["usd"])
        else:
            unknown[instance_type] = str(entry.get("reason") or "no answer")
    if changed:
        _write_cache(config, cache)
    return OnDemand(prices, unknown)


class _Lazy:
    """The pricing client, made on the first call (inside `_ask`'s error handling: a
    missing profile fails that call, not `status`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.client: Any = None

    def get_products(self, **kwargs: Any) -> Any:
        if self.client is None:
            self.client = make_pricing_client(self.config)
        return self.client.get_products(**kwargs)


def _ask(client: Any, instance_type: str, region: str, moment: float) -> dict[str, Any]:
    try:
        answer = client.get_products(ServiceCode="AmazonEC2", FormatVersion="aws_v1",
                                     Filters=product_filters(instance_type, region),
                                     MaxResults=10)
        usd = hourly_usd(answer["PriceList"])
    except (ClientError, BotoCoreError, ValueError, KeyError, TypeError,
            AttributeError) as error:
        return {"usd": None, "reason": failure_reason(error), "at": moment,
                "ttl": FAILURE_SECONDS, "failed": True}
    if usd is None:
        return {"usd": None, "reason": f"no Linux on-demand price listed in {region}",
                "at": moment, "ttl": FRESH_SECONDS}
    return {"usd": usd, "at": moment, "ttl": FRESH_SECONDS}


def _fresh(entry: Any, moment: float) -> bool:
    if not isinstance(entry, dict):
        return False
    try:
        return 0 <= moment - float(entry["at"]) < float(entry["ttl"])
    except (KeyError, TypeError, ValueError):
        return False


def _read_cache(config: Config) -> dict[str, Any]:
    """The cached answers; empty when there is none, it is damaged or unsafe to read (the
    prices are then asked again, never read through a planted link)."""
    try:
        return statefiles.read_json_object(config.state_dir / CACHE_FILE)
    except (statefiles.StateFileError, OSError):
        return {}


def _write_cache(config: Config, cache: Mapping[str, Any]) -> None:
    """Keep the answers; a STATE_DIR that cannot take them only costs a call next time."""
    try:
        folder = statefiles.ensure_dir(config.state_dir)
        statefiles.write_atomic(folder / CACHE_FILE,
                                json.dumps(cache, sort_keys=True, indent=1).encode())
    except (statefiles.StateFileError, OSError):
        pass
