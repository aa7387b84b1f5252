"""COCO-Stuff's 183 semantic classes read as COCO panoptic's 133 categories.

COCO panoptic (2018) was made from COCO-Stuff by the rules of cocodataset.org/#panoptic-eval:
the 80 thing categories and 36 stuff categories keep their ids; 17 new "-merged" stuff
categories (ids 184-200) each gather 2-4 stuff classes; 12 stuff classes were removed (their
pixels are void). HTC's semantic branch predicts COCO-Stuff's stuffthingmaps labels, label
``k`` being COCO-Stuff id ``k + 1`` (ids 1-91 things, 11 of them unused; 92-182 stuff; 183
"other", never in the maps).
"""

from typing import Dict, List

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

# COCO-Stuff's stuff classes in id order: ids 92 (banner) to 182 (wood).
COCO_STUFF_STUFF_NAMES = (
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet "
    "ceiling-other ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt "
    "door-stuff fence floor-marble floor-other floor-stone floor-tile floor-wood flower fog "
    "food-other fruit furniture-other grass gravel ground-other hill house leaves light mat metal "
    "mirror-stuff moss mountain mud napkin net paper pavement pillow plant-other plastic platform "
    "playingfield railing railroad river road rock roof rug salad sand sea shelf sky-other "
    "skyscraper snow solid-other stairs stone straw structural-other table tent textile-other "
    "towel tree vegetable wall-brick wall-concrete wall-other wall-panel wall-stone wall-tile "
    "wall-wood water-other waterdrops window-blind window-other wood"
).split()
FIRST_STUFF_ID = 92
COCO_STUFF_CLASSES = 183  # stuffthingmaps labels 0..181 (+1 of head-room), 255 = unlabeled

# The panoptic categories that gather several COCO-Stuff stuff classes.
MERGED = {
    "tree-merged": ("branch", "tree", "bush", "leaves"),
    "fence-merged": ("cage", "fence", "railing"),
    "ceiling-merged": ("ceiling-tile", "ceiling-other"),
    "sky-other-merged": ("clouds", "sky-other", "fog"),
    "cabinet-merged": ("cupboard", "cabinet"),
    "table-merged": ("desk-stuff", "table"),
    "floor-other-merged": ("floor-marble", "floor-other", "floor-tile"),
    "pavement-merged": ("floor-stone", "pavement"),
    "mountain-merged": ("hill", "mountain"),
    "grass-merged": ("moss", "grass", "straw"),
    "dirt-merged": ("mud", "dirt"),
    "paper-merged": ("napkin", "paper"),
    "food-other-merged": ("salad", "vegetable", "food-other"),
    "building-other-merged": ("skyscraper", "building-other"),
    "rock-merged": ("stone", "rock"),
    "wall-other-merged": ("wall-other", "wall-concrete", "wall-panel"),
    "rug-merged": ("mat", "rug", "carpet"),
}
# COCO-Stuff stuff classes that COCO panoptic has no category for (void there).
REMOVED = (
    "furniture-other metal plastic solid-other structural-other waterdrops textile-other cloth "
    "clothes plant-other wood ground-other"
).split()

COCO_PANOPTIC_SPLITS = (
    "coco_2017_train_panoptic",
    "coco_2017_val_panoptic",
    "coco_2017_val_100_panoptic",
)


def coco_stuff_to_panoptic() -> List[int]:
    """For each of the 183 semantic classes (stuffthingmaps label k), the COCO panoptic category
    id it belongs to, 0 where none (removed classes, unused thing ids, "other")."""
    panoptic_ids: Dict[str, int] = {c["name"]: c["id"] for c in COCO_CATEGORIES}
    merged_into = {name: merged for merged, names in MERGED.items() for name in names}
    table = [0] * COCO_STUFF_CLASSES
    for c in COCO_CATEGORIES:
        if c["isthing"]:
            table[c["id"] - 1] = c["id"]
    for i, name in enumerate(COCO_STUFF_STUFF_NAMES):
        if name not in REMOVED:
            table[FIRST_STUFF_ID + i - 1] = panoptic_ids[merged_into.get(name, name)]
    return table


def coco_stuff_names() -> List[str]:
    """The names of the 183 semantic classes (stuffthingmaps label k, COCO-Stuff id k + 1):
    COCO's things, "unused <id>" for the 11 thing ids COCO leaves out, the stuff, "other"."""
    names = {c["id"]: c["name"] for c in COCO_CATEGORIES if c["isthing"]}
    names.update({FIRST_STUFF_ID + i: name for i, name in enumerate(COCO_STUFF_STUFF_NAMES)})
    names[COCO_STUFF_CLASSES] = "other"
    return [names.get(k + 1, f"unused {k + 1}") for k in range(COCO_STUFF_CLASSES)]


def register_coco_panoptic_htc() -> None:
    """Give Detectron2's COCO panoptic datasets (``coco_2017_{train,val,val_100}_panoptic``,
    registered by Detectron2 itself) the ``semantic_to_panoptic`` table HTC's output reads."""
    for name in COCO_PANOPTIC_SPLITS:
        MetadataCatalog.get(name).set(semantic_to_panoptic=coco_stuff_to_panoptic())
