"""Pure functions that build a `Tree`: classic trees and trees from descriptions.

Every builder takes plain arrays and returns a validated `Tree`; none does I/O.

- `huffman`: binary or n-ary Huffman tree of class counts (optimal expected depth).
- `balanced`: complete, evenly split tree of fanout k over classes in a given order.
- `random_tree`: a seeded random tree.
- `frequency_cutoffs`: the adaptive-softmax shape (head of frequent classes + tail clusters).
- `cluster_tree`: recursive balanced k-means or PCA splits of class embeddings.
- `classic_trees`: the one registry of the classic trees every search is compared with.
- `from_merges`: bottom-up construction from a sequence of merges (word2vec's numbering).
- `from_nested`, `from_children`, `from_parents`: from hand-written descriptions.
- `from_taxonomy`, `from_categories`: from a parent relation or class categories, with node names.
- `grow_tree`: new classes added to a tree (`nearest_classes`, `place_by_frequency`: where).
"""

from tree_search.builders.classics import (
    ADAPTIVE_SHAPES,
    CLASSIC_NAMES,
    CLASSIC_SETS,
    CUTOFF_SHAPES,
    HEAD_MASS,
    ClassicTree,
    baseline_names,
    classic_names,
    classic_trees,
    too_large,
)
from tree_search.builders.cluster import cluster_tree, order_group, order_groups
from tree_search.builders.frequency import cutoffs_by_mass, frequency_cutoffs, grave_cutoffs, huffman, projected_cutoffs
from tree_search.builders.grow import ATTACH_MODES, grow_tree, nearest_classes, place_by_frequency
from tree_search.builders.structure import (
    balanced,
    binarized,
    from_children,
    from_merges,
    from_nested,
    from_parents,
    random_tree,
)
from tree_search.builders.taxonomy import UNKNOWN_MODES, TaxonomyError, from_categories, from_taxonomy

__all__ = [
    "ADAPTIVE_SHAPES",
    "baseline_names",
    "CUTOFF_SHAPES",
    "ATTACH_MODES",
    "CLASSIC_NAMES",
    "CLASSIC_SETS",
    "ClassicTree",
    "HEAD_MASS",
    "TaxonomyError",
    "UNKNOWN_MODES",
    "balanced",
    "binarized",
    "classic_names",
    "classic_trees",
    "too_large",
    "cluster_tree",
    "cutoffs_by_mass",
    "frequency_cutoffs",
    "grave_cutoffs",
    "from_categories",
    "from_children",
    "from_merges",
    "from_nested",
    "from_parents",
    "from_taxonomy",
    "grow_tree",
    "nearest_classes",
    "place_by_frequency",
    "huffman",
    "order_group",
    "order_groups",
    "projected_cutoffs",
    "random_tree",
]
