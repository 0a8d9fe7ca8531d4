"""The marketplace's domain metrics (Prometheus), counted when their transaction commits.

Beside the kit's RED metrics per route, operators watch the work itself: items leased
and answered, reviews, and money moving through the ledger.
"""

from __future__ import annotations

from prometheus_client import Counter

ASSIGNMENTS_CLAIMED = Counter(
    "marketplace_assignments_claimed_total", "Items leased to annotators", ["gold"]
)
ASSIGNMENTS_SUBMITTED = Counter(
    "marketplace_assignments_submitted_total", "Answers handed in by annotators", ["gold"]
)
SUBMISSIONS_REVIEWED = Counter(
    "marketplace_submissions_reviewed_total",
    "Answers accepted or rejected (automatic: accepted when the review period ran out)",
    ["outcome", "automatic"],
)
LEDGER_POSTINGS = Counter("ledger_postings_total", "Journal entries posted", ["kind"])
LEDGER_CREDITS = Counter(
    "ledger_credits_moved_total", "Credits moved by journal entries (debit side)", ["kind"]
)
