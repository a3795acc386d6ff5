"""Word lists the prompt decomposer tags tokens with.

Closed classes (determiners, number words, prepositions, auxiliaries) are complete for English prompts; open classes
(attributes, verbs, nouns that end like verbs) hold the words compositional text-to-image prompts actually use — the
T2I-CompBench++ categories: color, shape (and size), texture / material, 2D and 3D spatial relations, numeracy,
non-spatial relations. A word missing from an open list is still handled: unknown words are read as nouns or noun
modifiers, so the question keeps the word, only its attribute category is unknown.
"""

from __future__ import annotations

# --- attributes, by category ---------------------------------------------------------------------------------------
COLORS = frozenset(
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden beige tan violet "
    "turquoise navy teal maroon crimson cyan magenta ivory indigo amber bronze scarlet lime-green emerald "
    "multicolored colorful rainbow-colored".split()
)

SHAPES = frozenset(
    "round square triangular rectangular oval circular spherical conical cylindrical cubic cube-shaped pyramidal "
    "pentagonal hexagonal octagonal oblong teardrop crescent diamond star-shaped heart-shaped curved angular flat "
    "rounded zigzag wavy elliptical egg-shaped domed arched spiral hexagon".split()
)

SIZES = frozenset(
    "big small tall short large tiny huge little giant long thin wide narrow thick mini massive slim skinny fat "
    "low high petite enormous miniature".split()
)

TEXTURES = frozenset(
    "wooden wood metallic metal plastic fluffy leather glass rubber fabric furry fuzzy silk silky velvet velvety "
    "cotton woolen wool woollen marble stone ceramic porcelain steel stainless iron brick concrete crystal denim "
    "satin lace plush smooth rough soft hard bumpy spiky prickly shiny glossy matte sleek polished textured jagged "
    "slimy sticky crisp crunchy sandy rocky grassy mossy icy frosty rusty dusty glassy translucent opaque striped "
    "dotted checkered sparkling shimmering gleaming feathery knitted woven quilted wicker bamboo paper cardboard "
    "copper brass aluminum clay granite suede tweed linen flannel wet dry".split()
)

# Other common adjectives, so that a predicate such as "feeling curious" or "is beautiful" is read as an attribute.
OTHER_ADJECTIVES = frozenset(
    "warm cool cold hot bright dark sharp sweet delicate cozy vibrant beautiful natural juicy intricate new old "
    "fresh deep heavy stunning fragrant gentle elegant ripe plump gnarled curious peaceful happy sad calm quiet "
    "serene playful lively busy empty full clean dirty modern vintage ancient antique rustic elegant luxurious "
    "comfortable sturdy fragile shabby cute lovely pretty ugly young friendly lonely tired sleepy excited proud "
    "majestic colourful pale vivid dim rich sour bitter salty savory tangy spicy creamy fiery wild tropical "
    "exotic fancy simple plain ornate decorative festive romantic crowded cluttered spacious tranquil rugged "
    "fierce brave strong weak healthy delicious tasty pristine shimmery radiant glowing healthy safe".split()
)

ATTRIBUTE_CATEGORIES = {"color": COLORS, "shape": SHAPES, "size": SIZES, "texture": TEXTURES}

# Attribute words that are also ordinary nouns: when one ends a noun phrase, it is the head ("a red orange").
ATTRIBUTE_NOUNS = frozenset(
    "orange gold silver glass diamond wood metal leather fabric rubber plastic stone marble crystal square "
    "crescent cube lace brick paper velvet silk cotton wool steel iron copper brass bamboo clay granite cardboard "
    "teardrop rainbow wicker denim linen suede tweed flannel cream lime violet amber bronze".split()
)

# --- closed classes ------------------------------------------------------------------------------------------------
DETERMINERS = frozenset(
    "a an the this that these those his her their its my our your some each every another any several many few "
    "no".split()
)
PLURAL_DETERMINERS = frozenset("these those several many few some".split())

NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
    "eighteen": 18, "nineteen": 19, "twenty": 20,
}  # fmt: skip
WORDS_FOR_NUMBERS = {value: word for word, value in NUMBER_WORDS.items()}

CONJUNCTIONS = frozenset("and or but nor".split())
# Words that open a new clause: a noun phrase right after one of these is a new subject, not a coordinated one.
CLAUSE_MARKERS = frozenset("while as when because so then where whereas although though until since once".split())
RELATIVE_PRONOUNS = frozenset("that which who whom whose".split())
PRONOUNS = frozenset(
    "it they them he him she we us you i me itself themselves himself herself everyone everything someone "
    "something anyone anything nobody nothing one's each other".split()
)

AUXILIARIES = frozenset("is are was were be been being am 's do does did can could will would may might".split())
HAVE_VERBS = frozenset("has have had".split())

PREPOSITIONS = frozenset(
    "of with in on at to from for by about into onto inside outside across through along around against among "
    "between within without toward towards past over under above below beneath underneath beside near behind "
    "upon amid during after before like than via throughout alongside atop off up down out".split()
)
# Adverb-like particles a verb can take ("jotting down notes", "cuddled up on the couch").
PARTICLES = frozenset("down up out off away back together around over forth apart along".split())
ADVERBS = frozenset(
    "very too so not also just still always never almost quite rather really even here there then now again "
    "once soon well far nearby high low slowly fast hard".split()
)

# --- relations -----------------------------------------------------------------------------------------------------
# Multi-word and single-word spatial phrases -> the canonical wording the questions use. Longest match wins.
SPATIAL_PHRASES = {
    "on the left of": "to the left of", "to the left of": "to the left of", "on the left side of": "to the left of",
    "at the left of": "to the left of", "left of": "to the left of",
    "on the right of": "to the right of", "to the right of": "to the right of",
    "on the right side of": "to the right of", "at the right of": "to the right of", "right of": "to the right of",
    "on the top of": "on top of", "on top of": "on top of", "at the top of": "on top of", "atop": "on top of",
    "on the bottom of": "below", "at the bottom of": "below", "below": "below", "beneath": "below",
    "underneath": "below", "under": "under", "above": "above", "over": "over",
    "next to": "next to", "beside": "next to", "besides": "next to", "on side of": "next to",
    "on the side of": "next to", "by the side of": "next to", "alongside": "next to", "close to": "near",
    "near": "near", "nearby": "near",
    "behind": "behind", "in back of": "behind", "at the back of": "behind", "in front of": "in front of",
    "hidden by": "hidden by", "hidden behind": "hidden by", "obscured by": "hidden by", "blocked by": "hidden by",
    "occluded by": "hidden by",
    "on": "on", "in": "in", "inside": "in", "within": "in", "into": "in", "onto": "on", "at": "at",
    "across": "across", "through": "through", "along": "along", "around": "around", "against": "against",
    "among": "among", "between": "between", "upon": "on", "by": "near",
}  # fmt: skip
MAX_PHRASE_WORDS = max(len(phrase.split()) for phrase in SPATIAL_PHRASES)

# A noun phrase "X of Y" whose X is one of these is one entity ("a slice of bread", "a group of people").
PARTITIVES = frozenset(
    "slice slices piece pieces pair pairs group groups bunch bunches bouquet bouquets set sets stack stacks pile "
    "piles cup cups bowl bowls glass glasses jar jars bottle bottles plate plates box boxes bag bags basket baskets "
    "loaf loaves sheet sheets mug mugs herd herds flock flocks couple row rows line lines team teams crowd crowds "
    "pack packs handful field fields collection collections block blocks tube tubes can cans carton cartons packet "
    "packets scoop scoops drop drops bar bars tray trays vase vases pot pots kind type variety cluster clusters "
    "school swarm".split()
)

# --- verbs ---------------------------------------------------------------------------------------------------------
# Irregular past forms -> the -ing form the questions use.
IRREGULAR_VERBS = {
    "sat": "sitting", "stood": "standing", "lay": "lying", "hung": "hanging", "held": "holding",
    "shone": "shining", "rode": "riding", "took": "taking", "did": "doing", "felt": "feeling", "blew": "blowing",
    "ran": "running", "made": "making", "fell": "falling", "flew": "flying", "drew": "drawing", "wrote": "writing",
    "spun": "spinning", "struck": "striking", "swam": "swimming", "led": "leading", "kept": "keeping",
    "went": "going", "gave": "giving", "saw": "seeing", "ate": "eating", "sang": "singing", "threw": "throwing",
    "caught": "catching", "brought": "bringing", "built": "building", "sent": "sending", "grew": "growing",
    "hid": "hiding", "lit": "lighting", "stuck": "sticking", "swung": "swinging", "wore": "wearing",
    "shot": "shooting", "spread": "spreading", "bit": "biting", "broke": "breaking", "drove": "driving",
    "froze": "freezing", "rose": "rising", "sank": "sinking", "slept": "sleeping", "spoke": "speaking",
    "stole": "stealing", "swept": "sweeping", "taught": "teaching", "told": "telling", "wove": "weaving",
    "lies": "lying", "rang": "ringing", "dove": "diving", "leapt": "leaping", "knelt": "kneeling", "sought": "seeking",
    "fought": "fighting", "bought": "buying", "chose": "choosing", "dug": "digging", "fed": "feeding",
    "found": "finding", "met": "meeting", "paid": "paying", "won": "winning", "wound": "winding", "sped": "speeding",
}  # fmt: skip

# Base forms of verbs that end a noun phrase when they follow its noun ("the metallic pot and wooden spoon simmer on
# the stove"). Inflected forms (-s, -es, -ed) are recognized from these.
VERB_BASES = frozenset(
    "sit stand hang lie rest hold float drift glide simmer stir decorate complete illuminate clink make support "
    "provide add contrast fill bloom shine tower reflect sparkle glisten glitter gleam shimmer sway rustle "
    "splash stretch loom soar perch nestle adorn cover fly take creak tick slide look fall unlock glint sit "
    "hop jump run walk swim sleep play ride eat drink read write sing dance chase watch hug carry pull push "
    "lean rest wait grow sip bounce climb crawl roll spin lay serve stir brew bake cook cut pour wash shake "
    "gaze stare wander roam graze bark purr meow chirp buzz flutter flow drip melt burn glow twinkle flicker "
    "cascade crash tumble wrap drape cradle frame line guard greet face hover rise sink dive leap land perch "
    "tighten complement match enhance accentuate brighten highlight catch throw kick hit beat feed pet kiss "
    "light mount suspend balance prop stack lift hide hold keep display cast stir clutter mix signal "
    "quench welcome warm soothe beckon tantalize accompany await correct fasten go prepare protect remove "
    "secure shift smell open close split tie dig shoot create".split()
)
# Verbs that are just as often nouns; they end a noun phrase only when an object or preposition follows directly.
NOUNLIKE_VERBS = frozenset(
    "stand display cast line set hold frame face guard light ring match mount balance stack signal "
    "support play watch drink cut land lean mix hug run walk ride swim sleep dance fall look drift float spin "
    "climb crawl roll brew pour wash shake gaze stare flow drip burn glow flicker cascade crash wrap drape cradle "
    "hover rise sink dive leap perch catch throw kick hit beat feed pet kiss lift hide keep wait grow sip "
    "bounce fly take tick slide".split()
)

# Words ending in -ing that are only nouns ("the ceiling"), and -ing words that are nouns or verbs ("a painting" /
# "is painting a wall"): the second kind is a verb after "is" or before an object, else a noun.
PURE_ING_NOUNS = frozenset(
    "ceiling morning evening ring thing string wing king spring pudding bedding railing awning wedding icing "
    "stuffing sibling duckling earring earrings stocking stockings sling dumpling dumplings wiring flooring "
    "siding clearing dwelling cling ping sting something nothing anything everything".split()
)
ING_NOUNS = frozenset(
    "building buildings painting paintings clothing frosting topping toppings seasoning filling swing lighting "
    "drawing drawings carving carvings landing sewing shopping camping beginning ending meeting setting "
    "serving seating opening covering crossing offering recording reading writing".split()
)
# -ing words that, right before a noun, name a kind of thing ("dining table", "living room", "cutting board").
ING_MODIFIERS = frozenset(
    "dining living cutting serving measuring magnifying sewing swimming running shopping fishing rocking "
    "sleeping washing baking frying mixing boxing racing hiking walking climbing reading writing drawing "
    "waiting changing dressing parking landing baking ironing folding skating bowling driving diving "
    "surfing skiing setting rolling petting".split()
)

# Words ending in -ed that are nouns, and -ly words that are nouns or adjectives, not participles / adverbs.
ED_NOUNS = frozenset("bed shed sled seed weed reed steed hundred sofa-bed flowerbed seabed".split())
LY_WORDS = frozenset(
    "family lily belly jelly butterfly fly dragonfly firefly ally holly bully gully supply rally anomaly "
    "lovely friendly lonely curly ugly silly chilly hilly jolly woolly bubbly wobbly prickly "
    "sparkly cuddly frilly grizzly wrinkly melancholy early daily italy".split()
)

# --- nouns ---------------------------------------------------------------------------------------------------------
IRREGULAR_PLURALS = {
    "mice": "mouse", "men": "man", "women": "woman", "people": "person", "children": "child", "geese": "goose",
    "feet": "foot", "teeth": "tooth", "oxen": "ox", "knives": "knife", "leaves": "leaf", "shelves": "shelf",
    "wolves": "wolf", "loaves": "loaf", "halves": "half", "scarves": "scarf", "calves": "calf", "lives": "life",
    "wives": "wife", "thieves": "thief", "cacti": "cactus", "fungi": "fungus", "dice": "die", "policemen": "policeman",
    "firemen": "fireman", "fishermen": "fisherman", "businessmen": "businessman", "snowmen": "snowman",
    "hooves": "hoof", "elves": "elf", "selves": "self", "lice": "louse", "dwarves": "dwarf",
}  # fmt: skip
# Nouns that are the same in the singular and the plural, and singular nouns that end in s.
INVARIANT_NOUNS = frozenset(
    "sheep fish deer shrimp goldfish salmon trout moose bison squid series species aircraft offspring swine "
    "cod tuna".split()
)
SINGULAR_S_NOUNS = frozenset(
    "glass bus gas dress grass class cactus octopus iris lens canvas compass mattress walrus circus atlas "
    "hippopotamus rhinoceros platypus asparagus hummus chess boss moss cross kiss process princess actress "
    "hostess waitress business address fortress goddess mistress harness witness tennis this news physics "
    "series species bonus virus campus status focus crocus citrus hibiscus eucalyptus lotus fungus walrus "
    "yes plus bias alias chorus census surplus".split()
)
