"""The AWS Price List API's GetProducts, as the local endpoint answers it (moto has none).

Each requested instance type gets a small catalog shaped like AWS's (one JSON document
per product in ``PriceList``, an ``OnDemand`` term with an hourly USD price dimension):
the plain Linux product at the installed market's on-demand price, and variants that a
client must filter out (Windows, dedicated tenancy, pre-installed SQL, unused and
allocated capacity reservations). Only TERM_MATCH filters on product attributes are
understood, as the project sends them; anything else is a ValidationException.
"""

from __future__ import annotations

import json
from typing import Any

from .market import HttpReply, SpotMarket

PRICING_TARGET = "AWSPriceListService."
JSON_TYPE = [("Content-Type", "application/x-amz-json-1.1")]
OFFER_TERM = "JRTCKXETXF"  # the code AWS uses for on-demand terms
RATE = "6YS6EN2CT7"
#: (attributes that differ from the plain Linux product, price factor, price added)
VARIANTS: tuple[tuple[dict[str, str], float, float], ...] = (
    ({}, 1.0, 0.0),
    ({"operatingSystem": "Windows", "licenseModel": "License Included"}, 1.0, 0.092),
    ({"tenancy": "Dedicated"}, 1.1, 0.0),
    ({"preInstalledSw": "SQL Web"}, 1.0, 0.12),
    ({"capacitystatus": "UnusedCapacityReservation"}, 1.0, 0.0),
    ({"capacitystatus": "AllocatedCapacityReservation"}, 0.0, 0.0),
)


def pricing_reply(target: str, body: bytes) -> HttpReply:
    """The HTTP answer to one Price List call (X-Amz-Target ``target``)."""
    if target != PRICING_TARGET + "GetProducts":
        return _error("UnknownOperationException", f"{target} is not served here")
    try:
        request = json.loads(body or b"{}")
        answer = get_products(request)
    except (ValueError, KeyError, TypeError) as error:
        return _error("ValidationException", str(error))
    return 200, JSON_TYPE, json.dumps(answer).encode()


def get_products(request: dict[str, Any]) -> dict[str, Any]:
    """GetProducts over the catalog of the types named by an ``instanceType`` filter."""
    if request.get("ServiceCode") != "AmazonEC2":
        raise ValueError("only ServiceCode AmazonEC2 is served here")
    terms: dict[str, str] = {}
    for item in request.get("Filters") or []:
        if item.get("Type") != "TERM_MATCH":
            raise ValueError(f"filter type {item.get('Type')!r} is not served here")
        terms[item["Field"]] = item["Value"]
    market = SpotMarket.installed()
    instance_type = terms.get("instanceType")
    found: list[str] = []
    if market is not None and instance_type:
        for product in catalog(instance_type, market.region,
                               market.on_demand_price(instance_type)):
            attributes = product["product"]["attributes"]
            if all(attributes.get(k) == v for k, v in terms.items()):
                found.append(json.dumps(product))
    return {"FormatVersion": request.get("FormatVersion", "aws_v1"), "PriceList": found}


def catalog(instance_type: str, region: str, usd: float) -> list[dict[str, Any]]:
    """The products of one type in one region, the Linux one at ``usd`` per hour."""
    products = []
    for number, (changes, factor, added) in enumerate(VARIANTS):
        sku = f"SANDBOX{number}{instance_type.upper().replace('.', '')}"
        attributes = {
            "servicecode": "AmazonEC2", "instanceType": instance_type, "regionCode": region,
            "operatingSystem": "Linux", "tenancy": "Shared", "preInstalledSw": "NA",
            "capacitystatus": "Used", "licenseModel": "No License required",
            "operation": "RunInstances", "usagetype": f"BoxUsage:{instance_type}",
            **changes,
        }
        price = f"{usd * factor + added:.10f}"
        dimension = {"unit": "Hrs", "endRange": "Inf", "beginRange": "0", "appliesTo": [],
                     "rateCode": f"{sku}.{OFFER_TERM}.{RATE}", "pricePerUnit": {"USD": price},
                     "description": f"${price} per On Demand {attributes['operatingSystem']} "
                                    f"{instance_type} Instance Hour"}
        products.append({
            "product": {"productFamily": "Compute Instance", "attributes": attributes,
                        "sku": sku},
            "serviceCode": "AmazonEC2",
            "terms": {"OnDemand": {f"{sku}.{OFFER_TERM}": {
                "priceDimensions": {f"{sku}.{OFFER_TERM}.{RATE}": dimension},
                "sku": sku, "effectiveDate": "2026-11-01T00:00:00Z",
                "offerTermCode": OFFER_TERM, "termAttributes": {}}}},
            "version": "20261101000000", "publicationDate": "2026-11-01T00:00:00Z",
        })
    return products


def _error(code: str, message: str) -> HttpReply:
    return 400, JSON_TYPE, json.dumps({"__type": code, "message": message}).encode()
