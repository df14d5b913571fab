"""The one rule for sending a lost request again, kept by the gateway live and by the
simulator's clients alike.

A request is lost when its worker dies, a KV handover fails, or the planner preempts it for
room; every open request is sent again when the planner restarts. Its client has some tokens
already: the request goes back to the planner with them as `resume_token_ids`, so the stream
continues after them without gaps or repeats. Failures count towards a limit, past which the
request ends with an error; preemptions and restarts do not count (they are no fault of the
request's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from shared.messages import Lost, Submit

MAX_RESUBMITS = 3  # failures a request survives


@dataclass
class Resubmissions:
    attempts: dict[str, int] = field(default_factory=dict)  # request -> failures so far

    def again(self, original: Submit, lost: Lost, delivered: list[int]) -> Submit | None:
        """The submission to send after `lost`, continuing after the `delivered` tokens; None
        when the request has failed too often and must end with an error."""
        failures = self.attempts[lost.request_id] = self.attempts.get(lost.request_id, 0) + (not lost.preempted)
        if failures > MAX_RESUBMITS:
            return None
        return msgspec.structs.replace(original, resume_token_ids=list(delivered))

    def forget(self, request_id: str) -> None:
        self.attempts.pop(request_id, None)

    def after_restart(self, original: Submit, delivered: list[int]) -> Submit:
        """The submission for a planner that restarted: no failure of the request's, so it
        does not count; a planner that has it already (it was queued for it) ignores it."""
        return msgspec.structs.replace(original, resume_token_ids=list(delivered), after_restart=True)
