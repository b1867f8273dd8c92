"""A fleet of devices learning together on Flower: what crosses the wire is adapter factors and
window counts, never readings."""
