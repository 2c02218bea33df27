"""The points mall: items for points (and cash), exchanges, stock and per-member
limits, shipping of goods."""
