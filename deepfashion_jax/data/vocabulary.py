"""Fixed facts of the DeepFashion Category and Attribute Prediction benchmark.

The category list is the benchmark's own (`list_category_cloth.txt` order). Every
label-like value in this package is 0-based: category 0 is Anorak, garment type 0 is
upper-body, attribute type 0 is texture. The files count from 1.
"""

CATEGORY_NAMES = (
    # Upper-body (garment type 0).
    'Anorak', 'Blazer', 'Blouse', 'Bomber', 'Button-Down', 'Cardigan', 'Flannel',
    'Halter', 'Henley', 'Hoodie', 'Jacket', 'Jersey', 'Parka', 'Peacoat', 'Poncho',
    'Sweater', 'Tank', 'Tee', 'Top', 'Turtleneck',
    # Lower-body (garment type 1).
    'Capris', 'Chinos', 'Culottes', 'Cutoffs', 'Gauchos', 'Jeans', 'Jeggings',
    'Jodhpurs', 'Joggers', 'Leggings', 'Sarong', 'Shorts', 'Skirt', 'Sweatpants',
    'Sweatshorts', 'Trunks',
    # Full-body (garment type 2).
    'Caftan', 'Cape', 'Coat', 'Coverup', 'Dress', 'Jumpsuit', 'Kaftan', 'Kimono',
    'Nightdress', 'Onesie', 'Robe', 'Romper', 'Shirtdress', 'Sundress',
)
# Garment type of each category, 0-based (the file's 1, 2, 3 minus one).
CATEGORY_TYPES = (0,) * 20 + (1,) * 16 + (2,) * 14
GARMENT_TYPE_NAMES = ('upper-body', 'lower-body', 'full-body')
NUM_CATEGORIES = len(CATEGORY_NAMES)

ATTRIBUTE_TYPE_NAMES = ('texture', 'fabric', 'shape', 'part', 'style')
# How many of the 1,000 attributes the real list_attr_cloth.txt has of each type.
ATTRIBUTE_TYPE_COUNTS = (156, 218, 180, 216, 230)
NUM_ATTRIBUTES = sum(ATTRIBUTE_TYPE_COUNTS)

# Landmarks per garment type in list_landmarks.txt (upper 6, lower 4, full 8).
LANDMARKS_PER_GARMENT_TYPE = (6, 4, 8)
MAX_LANDMARKS = 8

# Images of the real release that no decoder can read; the reader drops them.
KNOWN_UNREADABLE_IMAGES = (
    'img/Knit_Bodycon_Skirt/img_00000017.jpg',
    'img/Striped_Maxi_Dress/img_00000002.jpg',
    'img/Crinkled_Satin_Halter_Dress/img_00000036.jpg',
)

SPLIT_NAMES = ('train', 'val', 'test')
