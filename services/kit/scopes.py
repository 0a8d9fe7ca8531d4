"""OAuth scopes understood across the platform (the authorization server's catalogue)."""

from __future__ import annotations

IDENTITY_SCOPES = {
    "openid": "Sign in and read your user id",
    "profile": "Read your display name",
    "email": "Read your email address",
}
API_SCOPES = {
    "membership:read": "Read firms, clusters, members, parks and audit events",
    "membership:write": "Change firms, clusters, members, parks, invitations and clients",
    "marketplace:read": "Read tasks, bids, contracts, results, ledger and reputation",
    "marketplace:write": "Post and work on tasks, bid, review, move credits",
    "messaging:read": "Read channels and messages",
    "messaging:write": "Send messages and manage channels",
    "metrics:read": "Read indicators, classifications and diagnostics",
    "metrics:write": "Import collaboration history and change metrics settings",
}
ALL_SCOPES = {**IDENTITY_SCOPES, **API_SCOPES}
DEFAULT_USER_SCOPE = " ".join(ALL_SCOPES)
