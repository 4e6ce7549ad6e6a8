"""Verify policies: how many of its draft tokens each decoding request verifies this step."""

from abc import ABC, abstractmethod

from scheduler.request import Request


class VerifyPolicy(ABC):
    name: str

    @abstractmethod
    def verify_lengths(self, requests: list[Request]) -> list[int]:
        """ℓ_r for each decoding request, each in 0..len(r.draft_token_ids)."""


class FixedVerify(VerifyPolicy):
    """Verify every proposed draft token (ℓ_r = the proposal's length, at most γ)."""

    name = "fixed"

    def verify_lengths(self, requests: list[Request]) -> list[int]:
        return [len(r.draft_token_ids) for r in requests]


class NoVerify(VerifyPolicy):
    """Plain decoding even when drafts exist (a baseline)."""

    name = "none"

    def verify_lengths(self, requests: list[Request]) -> list[int]:
        return [0] * len(requests)


def make_verify_policy(name: str) -> VerifyPolicy:
    policies = {p.name: p for p in (FixedVerify, NoVerify)}
    if name not in policies:
        raise ValueError(f"unknown verify policy {name!r}; available: {sorted(policies)}")
    return policies[name]()
