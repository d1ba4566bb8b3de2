"""A fixed vocabulary of common English words for ruler_cwe, and pseudo-words beyond it.

The official task draws from the ``wonderwords`` package's noun, adjective and verb lists
(``tasks/ruler/cwe.py``, a download we avoid). Ours: the list below (nouns, adjectives and
verbs we wrote), then, only when a very long prompt needs more distinct words than it
holds, pronounceable pseudo-words in a fixed order.
"""

from __future__ import annotations

import functools
import itertools
import random

_WORDS = """
able account acid active actor address advice affair agency agent air airport alarm album
alley anchor angle animal ankle answer apple april arch area arena argue army arrow art
artist ask attack attic aunt author autumn avenue award baby back bacon badge bag bake
bakery balance ball balloon band bank banner barn barrel base basin basket bath battery
battle beach beam bean bear beard beast beat bed bee beetle bell belt bench berry bicycle
bird birth biscuit bishop blade blanket blind block blood bloom blossom blue board boat body
boil bolt bone book boot border bottle bottom bowl box brain branch brass bread break brick
bride bridge bright broad bronze brother brown brush bucket budget build bulb bull bundle
burden burn bush butter button buy cabin cabinet cable cake calm camel camera camp canal
candle candy cannon canvas cape capital captain car card care carpet carrot cart carve
castle cat cattle cause cave ceiling cellar cement chain chair chalk channel chapel charge
chart chase cheap cheek cheese chef cherry chest chicken chief child chimney chin choir
church circle city claim clay clean clerk cliff climb clock cloth cloud clover club coach
coal coast coat code coffee coin cold collar colony color comb comfort copper cord corn
corner cottage cotton couch cough count country cousin cover cow crab craft crane crash
cream creek crew cricket crisp crop cross crowd crown cruel crystal cup curtain curve
cushion custom cycle daily dairy damage dance danger daring dark date daughter dawn deal
debate decade deck deep deer delay desert desk detail diamond diary dinner dirt dish
distant ditch dive doctor dog doll dolphin door dot double dough dragon drain drama drawer
dream dress drift drill drink drive drum duck dust eager eagle early earth east echo edge
eel egg elbow elder empty energy engine entry equal error escape evening event exam expert
fabric face factor fair faith falcon family famous farm fashion fast father fault feast
feather fence ferry fever field fig film finger fire fish flag flame flat fleet flight
flint flock floor flour flower flute foam fog folk food foot forest fork fort fossil fox
frame fresh friend frog frost fruit fuel funny fur gallery game garage garden garlic gate
gem gentle giant gift ginger glass glove glow glue goat gold golden goose grain grape
grass gravel gray great green grid grill grocer ground group grove guard guest guide
guitar gulf habit hair hall hammer hand handle harbor hard harvest hat hawk hay head
health heap heart heat hedge heel height helmet herb hero hill hinge history hive hobby
hole holiday honey hood hook hope horn horse hose hotel hour house humble hunger hut ice
idea image inch income index ink insect iron island ivory jacket jam jar jaw jelly jewel
job journey judge juice jump jungle kettle key kid king kitchen kite kitten knee knife
knight knot label lace ladder lady lake lamb lamp land lane lantern large laser laugh lawn
layer lead leaf leather lecture ledge lemon lens letter level library lid light lily limb
line linen lion lip liquid list lizard load loaf lobby lock lodge log loop lunch machine
magnet maid mail mango maple marble market mask meadow meal meat medal melon member
memory mercy metal middle mile milk mill mind mineral minute mirror mist model moment
money monkey month moon morning moss mother motor mountain mouse mouth mud muffin mule
muscle museum music nail napkin narrow nation nature neck needle nephew nest net night
noble noise noodle north nose note novel number nurse nut oak oar oat ocean office oil
olive onion orange orbit orchard organ oven owl owner ox oyster pace package paddle page
pain paint palace palm pan panel paper parade parcel parent park parrot party pass paste
path patrol pause peach peak pear pearl pebble pen pencil pepper person piano picnic pie
pig pigeon pillow pilot pin pine pipe pitch plain planet plant plate player plum pocket
poem poet point pole pond pony pool porch port post pot potato powder power prince print
prize proud pulse pump pupil puppy purple puzzle quarry queen quest quiet quilt rabbit
race radio raft rail rain rainbow ranch rapid raven razor reason record reed reef relief
rent rescue reward ribbon rice ridge rifle ring river road robin rock rocket roof room
root rope rose route royal rubber rug ruler rush saddle safe sail salad salmon salt sand
sauce sausage saw scale scarf scene school science scissors score screen sea season seat
secret seed shade shadow shape shark sheep shelf shell shield ship shirt shoe shop shore
shovel shower shrimp sign silk silver singer sister skate sketch skill skirt sky slate
sled sleeve slice slope smoke snack snail snake snow soap sock sofa soil soldier song soup
south space spade spark spear spice spider spirit sponge spoon spring square squirrel
stable stage stair stamp star station statue steam steel stem step stick stone stool
storm story stove straw stream street string student sugar suit summer sun supper swamp
swan sweater sweet swift sword table tail tailor tank tape target taste tea teacher team
temple tent thread throne thumb ticket tide tiger timber toast toe tomato tongue tool
tooth torch tower town toy track trade trail train tray treasure tree tribe truck trumpet
trunk tulip tunnel turkey turtle twig umbrella uncle valley valve van vase velvet vessel
village vine violin voice voyage wagon waist walnut wall wand war wave wax weather wedge
well whale wheat wheel whistle wild willow wind window wine wing winter wire wisdom wolf
wood wool worm yard yarn yellow young zebra zone
absorb admire adopt agree allow amuse arrange arrive avoid balance bathe beg behave bless
blink boast borrow bounce breathe bury calculate chew choose clap collect compare complain
confess consider copy crawl cry dare decide deliver depend describe deserve destroy
discover divide doubt drag dress earn embrace enjoy enter explain fasten fetch fill fold
follow forgive gather gaze giggle glance grab greet grin guess hang harm hatch heal hunt
hurry ignore imagine improve include inform inspect invent invite jog juggle kneel knit
land launch lean lend lick listen marry measure melt mend mix mourn nod obey observe offer
open order pack paddle pinch plant polish pour pray prefer prepare press pretend promise
protect pull punch push quarrel question raise reach recall reflect refuse reject relax
remain remind repair repeat reply retire return rinse rub scatter scold scrub search
settle shiver shrug sigh signal skip slide smile sneeze snore sparkle spill spin squeeze
stare steer stir stretch stumble supply suspect swallow sweep swing tease thank tickle
tremble trust twist unite unlock vanish visit wander warn wash wave whisper wink wipe
wobble worry wrap yawn yell
"""
WORDS = tuple(sorted(set(_WORDS.split())))
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


@functools.cache
def pseudo_words() -> tuple[str, ...]:
  """Pronounceable three-syllable pseudo-words (e.g. 'bakolu'), in a fixed order, none
  in WORDS (built on first use: only very long ruler_cwe prompts need them)."""
  syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
  combos = ["".join(x) for x in itertools.product(syllables, repeat=3)]
  random.Random("frontier-cwe-pseudo").shuffle(combos)
  known = set(WORDS)
  return tuple(w for w in combos if w not in known)
