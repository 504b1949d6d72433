"""Mapping a series: the output contract (:mod:`.results`), the method dispatcher (:mod:`.mapper`),
the learned methods through their bundles (:mod:`.learned`) and the physics-consistency check of any
method's maps (:mod:`.consistency`)."""

from .results import FLAG_ALPHA, METHOD_DESCRIPTIONS, OUTPUT_MAPS, MappingResult, output_arrays, sidecars_for
from .mapper import METHODS, add_consistency_maps, map_series

__all__ = ["OUTPUT_MAPS", "FLAG_ALPHA", "METHOD_DESCRIPTIONS", "MappingResult", "METHODS", "map_series",
           "add_consistency_maps", "sidecars_for", "output_arrays"]
