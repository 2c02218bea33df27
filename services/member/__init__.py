"""Member service: identity (OneID), profile, consent, PII protection, erasure."""
