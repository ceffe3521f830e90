"""`status` against on-demand: the Price List answer parsed, asked once per instance type
and cached a day in STATE_DIR, and never a reason for `status` to fail.

Unit tests read a GetProducts answer written here in the documented shape; the CLI tests
run the real `status` against the local endpoint, whose Price List answers come from the
spot market's on-demand prices (moto has no Price List API)."""

from __future__ import annotations

import json
import socket
import time

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from disposabledisco import pricing
from disposabledisco.config import load_config
from disposabledisco.pricing import (
    CACHE_FILE,
    FAILURE_SECONDS,
    FRESH_SECONDS,
    failure_reason,
    hourly_usd,
    on_demand_prices,
    product_filters,
)
from tests.cli_capture import cli


def product(usd: str, unit: str = "Hrs", sku: str = "DQ578CGN99KG6ECF") -> str:
    """One PriceList entry as the Price List API documents it: a JSON *string* holding the
    product, its on-demand term and a reserved term (which must be ignored)."""
    return json.dumps({
        "product": {"productFamily": "Compute Instance", "sku": sku, "attributes": {
            "instanceType": "m5.large", "regionCode": "us-east-1",
            "location": "US East (N. Virginia)", "operatingSystem": "Linux",
            "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used",
            "licenseModel": "No License required", "usagetype": "BoxUsage:m5.large"}},
        "serviceCode": "AmazonEC2",
        "terms": {
            "OnDemand": {f"{sku}.JRTCKXETXF": {
                "offerTermCode": "JRTCKXETXF", "sku": sku, "termAttributes": {},
                "effectiveDate": "2026-11-01T00:00:00Z",
                "priceDimensions": {f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                    "unit": unit, "beginRange": "0", "endRange": "Inf", "appliesTo": [],
                    "rateCode": f"{sku}.JRTCKXETXF.6YS6EN2CT7",
                    "description": f"${usd} per On Demand Linux m5.large Instance Hour",
                    "pricePerUnit": {"USD": usd}}}}},
            "Reserved": {f"{sku}.38NPMPTW36": {
                "offerTermCode": "38NPMPTW36", "sku": sku,
                "termAttributes": {"LeaseContractLength": "1yr", "PurchaseOption": "No Upfront",
                                   "OfferingClass": "standard"},
                "priceDimensions": {f"{sku}.38NPMPTW36.6YS6EN2CT7": {
                    "unit": "Hrs", "pricePerUnit": {"USD": "0.0600000000"},
                    "description": "Linux/UNIX (Amazon VPC), m5.large reserved instance"}}}},
        },
        "version": "20261101000000", "publicationDate": "2026-11-01T00:00:00Z",
    })


# ------------------------------------------------------------------ the answer
def test_the_hourly_on_demand_price_is_read_and_reserved_terms_are_not():
    assert hourly_usd([product("0.0960000000")]) == 0.096


def test_zero_and_non_hourly_dimensions_and_empty_answers_give_no_price():
    assert hourly_usd([]) is None
    assert hourly_usd([product("0.0000000000")]) is None  # e.g. an allocated reservation
    assert hourly_usd([product("12.0000000000", unit="Quantity")]) is None


def test_several_products_give_the_lowest_price_so_the_saving_is_never_overstated():
    assert hourly_usd([product("0.1880000000", sku="A"), product("0.0960000000", sku="B")]) \
        == 0.096


@pytest.mark.parametrize("broken", ["not json", json.dumps({"product": {}}),
                                    json.dumps({"terms": {"OnDemand": {"x": {}}}})])
def test_an_answer_not_in_the_documented_shape_is_an_error_not_a_price(broken):
    with pytest.raises((ValueError, KeyError)):
        hourly_usd([broken])


def test_the_filters_name_the_linux_shared_unlicensed_used_product_of_the_region():
    filters = product_filters("c5.xlarge", "eu-west-1")
    assert all(f["Type"] == "TERM_MATCH" for f in filters)
    assert {f["Field"]: f["Value"] for f in filters} == {
        "instanceType": "c5.xlarge", "regionCode": "eu-west-1", "operatingSystem": "Linux",
        "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used"}


@pytest.mark.parametrize(("error", "reason"), [
    (ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "GetProducts"),
     "pricing:GetProducts denied"),
    (ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow"}}, "GetProducts"),
     "pricing API said ThrottlingException"),
    (EndpointConnectionError(endpoint_url="https://api.pricing.us-east-1.amazonaws.com"),
     "pricing API unreachable"),
    (NoCredentialsError(), "no AWS credentials"),
    (KeyError("terms"), "unreadable pricing answer")])
def test_failures_are_said_in_a_few_words(error, reason):
    assert failure_reason(error) == reason


# ------------------------------------------------------------------ cache, real endpoint
@pytest.fixture
def priced_market(spot_market):
    """m5.large 0.0312 spot / 0.096 on demand, c5.large 0.03 / 0.085."""
    spot_market.fulfil_delay = 0
    spot_market.set_price("m5.large", 0.0312)
    spot_market.set_price("c5.large", 0.03)
    spot_market.on_demand_prices.update({"m5.large": 0.096, "c5.large": 0.085})
    return spot_market


def test_one_call_per_type_then_a_day_from_the_cache(write_config, priced_market, calls):
    config = load_config(write_config())
    start = time.time()
    found = on_demand_prices(config, ["m5.large", "c5.large", "m5.large"], now=start)
    assert dict(found.prices) == {"m5.large": 0.096, "c5.large": 0.085} and not found.unknown
    assert calls.count("GetProducts") == 2
    assert (config.state_dir / CACHE_FILE).stat().st_mode & 0o077 == 0
    priced_market.on_demand_prices["m5.large"] = 0.1  # AWS changed it; the cache still holds
    calls.clear()
    assert on_demand_prices(config, ["m5.large", "c5.large"],
                            now=start + FRESH_SECONDS - 1).prices["m5.large"] == 0.096
    assert calls == []
    assert on_demand_prices(config, ["m5.large"], now=start + FRESH_SECONDS + 1).prices == {
        "m5.large": 0.1}
    assert calls == ["GetProducts"]
    assert on_demand_prices(config, [], now=start) == pricing.OnDemand()


def test_the_price_is_the_one_of_the_configs_region(write_config, priced_market, calls):
    """The market serves us-east-1: asked for eu-west-1, the Price List lists nothing."""
    config = load_config(write_config(REGION="eu-west-1"))
    found = on_demand_prices(config, ["m5.large"])
    assert dict(found.unknown) == {"m5.large": "no Linux on-demand price listed in eu-west-1"}
    assert calls == ["GetProducts"]


def test_a_failure_is_kept_a_quarter_of_an_hour_then_asked_again(write_config, priced_market,
                                                                  local_ec2, calls):
    config = load_config(write_config())
    local_ec2.set_http_hook(deny_pricing, slot="deny")
    try:
        start = time.time()
        found = on_demand_prices(config, ["m5.large"], now=start)
        assert dict(found.unknown) == {"m5.large": "pricing:GetProducts denied"}
        assert on_demand_prices(config, ["m5.large"], now=start + 60).unknown == found.unknown
        assert calls.count("GetProducts") == 1  # the denial is not asked again at once
    finally:
        local_ec2.set_http_hook(None, slot="deny")
    later = on_demand_prices(config, ["m5.large"], now=start + FAILURE_SECONDS + 1)
    assert dict(later.prices) == {"m5.large": 0.096} and calls.count("GetProducts") == 2


def test_a_damaged_or_planted_cache_is_never_trusted(write_config, priced_market, calls):
    config = load_config(write_config())
    config.state_dir.mkdir(parents=True, mode=0o700)
    cache = config.state_dir / CACHE_FILE
    cache.write_text("{not json")
    assert on_demand_prices(config, ["m5.large"]).prices == {"m5.large": 0.096}
    assert json.loads(cache.read_text())["m5.large"]["usd"] == 0.096  # repaired
    elsewhere = config.state_dir.parent / "planted.json"
    elsewhere.write_text(json.dumps({"m5.large": {"usd": 0.001, "at": time.time(),
                                                  "ttl": FRESH_SECONDS}}))
    cache.unlink()
    cache.symlink_to(elsewhere)
    assert on_demand_prices(config, ["m5.large"]).prices == {"m5.large": 0.096}
    assert not cache.is_symlink() and json.loads(elsewhere.read_text())["m5.large"]["usd"] \
        == 0.001  # replaced, not followed


def deny_pricing(action: str | None):
    if action != "GetProducts":
        return None
    body = json.dumps({"__type": "AccessDeniedException",
                       "Message": "User is not authorized to perform: pricing:GetProducts"})
    return 400, [("Content-Type", "application/x-amz-json-1.1")], body.encode()


# ------------------------------------------------------------------ the real `status`
def mixed_cluster(write_config, market) -> str:
    """A c5.large master and 3 m5.large slaves, all running spot nodes."""
    path = str(write_config(NUM_SLAVES=3, MASTER_INSTANCE_TYPE="c5.large"))
    for _ in range(4):
        cli("up", path, "--ec2-only")
        market.tick(1)
    return path


def test_status_shows_on_demand_and_the_saving_with_one_call_per_type(
        write_config, priced_market, calls):
    path = mixed_cluster(write_config, priced_market)
    calls.clear()
    code, out, err = cli("status", path)
    print("status calls:", calls)
    assert sorted(calls) == sorted(["DescribeSpotInstanceRequests", "DescribeInstances",
                                    "DescribeSpotPriceHistory", "GetProducts",
                                    "GetProducts"]), calls
    assert "cost: 4 billed nodes, 0.1236 USD/hour at current spot prices" in out, out
    assert ("      on-demand: 0.373 USD/hour for the same nodes (c5.large 0.085/h, m5.large "
            "0.096/h); saving 0.2494 USD/hour (67%)") in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("master", "slave"))]
    assert len(rows) == 4 and "0.03/h (bid 0.10) on-demand 0.085/h" in rows[0]
    assert all("0.0312/h (bid 0.10) on-demand 0.096/h" in r for r in rows[1:]), out

    calls.clear()
    code, out, _ = cli("status", path, "--json")
    assert "GetProducts" not in calls, calls  # answered from STATE_DIR
    report = json.loads(out)
    assert report["cost"]["on_demand"] == {
        "usd_per_hour": 0.373, "saving_usd_per_hour": 0.2494, "saving_percent": 66.9,
        "unknown": None, "prices": {"c5.large": 0.085, "m5.large": 0.096}}
    assert sorted(n["on_demand_price"] for n in report["nodes"] if n["billed"]) == [
        0.085, 0.096, 0.096, 0.096]


def test_status_with_no_billed_node_asks_no_price(write_config, priced_market, calls):
    path = mixed_cluster(write_config, priced_market)
    assert cli("down", path, "--yes")[0] in (0, 10)
    priced_market.tick(1)
    calls.clear()
    code, out, _ = cli("status", path, "--json")
    assert "GetProducts" not in calls and "DescribeSpotPriceHistory" not in calls, calls
    assert json.loads(out)["cost"]["on_demand"] is None
    assert "on-demand" not in cli("status", path)[1]


def test_a_denied_pricing_call_never_fails_status(write_config, priced_market, local_ec2,
                                                  calls):
    path = mixed_cluster(write_config, priced_market)
    local_ec2.set_http_hook(deny_pricing, slot="deny")
    try:
        calls.clear()
        code, out, err = cli("status", path)
        assert code == 10 and "Traceback" not in err  # progressing (--ec2-only), as ever
        assert calls.count("GetProducts") == 1, calls  # the second type is not asked
        assert "      on-demand: unknown (pricing:GetProducts denied)" in out, out
        assert "cost: 4 billed nodes, 0.1236 USD/hour at current spot prices" in out
        code, out, _ = cli("status", path, "--json")
        assert json.loads(out)["cost"]["on_demand"] == {
            "usd_per_hour": None, "saving_usd_per_hour": None, "saving_percent": None,
            "unknown": "pricing:GetProducts denied", "prices": {}}
    finally:
        local_ec2.set_http_hook(None, slot="deny")


def test_an_unreachable_pricing_endpoint_is_unknown_quickly(write_config, priced_market,
                                                            calls, monkeypatch):
    """AWS_ENDPOINT_URL_PRICING wins over the local EC2 endpoint; nothing listens there."""
    path = mixed_cluster(write_config, priced_market)
    with socket.socket() as probe:  # a loopback port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_PRICING", f"http://127.0.0.1:{port}")
    calls.clear()
    started = time.monotonic()
    code, out, err = cli("status", path)
    took = time.monotonic() - started
    assert "      on-demand: unknown (pricing API unreachable)" in out, out + err
    assert "GetProducts" not in calls and took < 15, (calls, took)
    print(f"status with an unreachable pricing endpoint: {took:.1f} s")


def test_an_on_demand_node_is_priced_from_the_price_list_not_the_spot_prices():
    """An on-demand node has no spot price (even when its type has one) and costs its
    on-demand price: the saving for it is nothing."""
    from disposabledisco.cluster import Node
    from disposabledisco.report import _price_text, node_json, on_demand_json
    node = Node("master", "master", "m5.large", market="on-demand", instance_id="i-1",
                instance_state="running", state="ready")
    spot = {"m5.large": 0.0312}
    listed = pricing.OnDemand({"m5.large": 0.096})
    shown = node_json(node, spot, listed)
    assert (shown["spot_price_now"], shown["on_demand_price"]) == (None, 0.096)
    assert _price_text(node, spot, listed) == "0.096/h (on-demand)"
    against = on_demand_json([(node, 0.096)], listed)
    assert (against["usd_per_hour"], against["saving_usd_per_hour"]) == (0.096, 0.0)
