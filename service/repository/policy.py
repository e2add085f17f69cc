"""Version policies, as TF Serving and Triton name them: which versions of a model to serve."""

from __future__ import annotations

import re

_POLICY = re.compile(r"^(all|latest:[1-9]\d*|specific:[1-9]\d*(,[1-9]\d*)*)$")


def check_policy(policy: str) -> str:
    if not _POLICY.match(policy):
        raise ValueError(f"version policy {policy!r}: use all, latest:N or specific:1,2")
    return policy


def wanted_versions(policy: str, available: list[int]) -> list[int]:
    """The versions a policy serves out of those on disk (ascending)."""
    kind, _, arg = policy.partition(":")
    if kind == "all":
        return list(available)
    if kind == "latest":
        return available[-int(arg) :]
    return [v for v in available if v in {int(x) for x in arg.split(",")}]
