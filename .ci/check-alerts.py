#!/usr/bin/env python3
"""Checks the Helm chart's PrometheusRule as rendered (stdin): valid YAML, every rule an
alert with a severity and a summary, every expression valid PromQL (parsed and type-checked
by promql-parser), and every Roster metric it names one the server exports (README's table)."""
import re
import sys

import promql_parser
import yaml

docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
assert len(rules) == 1, f"expected one PrometheusRule, got {len(rules)}"
readme = open("README.md", encoding="utf-8").read()
alerts = [r for g in rules[0]["spec"]["groups"] for r in g["rules"]]
assert alerts, "no rules"
for rule in alerts:
    name = rule.get("alert")
    assert name and rule["labels"]["severity"] in ("warning", "critical"), rule
    assert rule["annotations"]["summary"], rule
    promql_parser.parse(rule["expr"])
    for metric in re.findall(r"\b(roster_[a-z_]+)", rule["expr"]):
        base = re.sub(r"_total$", "", metric)
        assert f"`{base}" in readme, f"{name}: {metric} is not among README's metrics"
print(f"PrometheusRule: {len(alerts)} alerts, valid PromQL, known metrics")
