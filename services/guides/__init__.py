"""The guides service: store staff and guides, WeCom customer-contact callbacks,
exclusive guide binding, order attribution, member tags and the private-domain
funnel (docs/guides.md)."""
