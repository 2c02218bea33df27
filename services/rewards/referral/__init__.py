"""Referral (裂变): invite codes, accepting an invite with its abuse checks, the
rewards each step grants, the fission report."""
