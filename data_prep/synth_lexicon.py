"""Word lists and sentence templates of the synthetic corpus (data_prep.synth_corpus).

Two lexicons: GENERAL (what the mini base is pretrained on: everyday sentences with names, places, numbers, dates,
prices and times in written form) and MEDICAL (the adaptation domain: drug names, conditions, procedures and units
that never occur in GENERAL, checked by `tests/test_synth_corpus.py`). Text is written the way a transcript writes
it: sentence case, names capitalised, numbers as digits, commas, full stops and question marks.
"""

from __future__ import annotations

FIRST_NAMES = """Aaron Abigail Adam Adrian Alan Albert Alex Alice Amanda Amber Amy Andrew Angela Anna Anne Anthony
Arthur Barbara Ben Benjamin Beth Betty Bill Bob Brandon Brian Bruce Carl Carlos Carol Caroline Catherine Charles
Charlotte Chris Christine Claire Colin Craig Daniel David Dennis Diana Donald Dorothy Douglas Edward Elena Elizabeth
Ellen Emily Emma Eric Ethan Eva Frank Fred Gary George Grace Greg Hannah Harold Harry Helen Henry Isaac Jack Jacob
James Jane Janet Jason Jeff Jennifer Jessica Joan John Jonathan Joseph Joshua Judy Julia Justin Karen Kate Keith
Kelly Kevin Laura Lauren Leo Linda Lisa Lucy Luke Margaret Maria Mark Martha Martin Mary Matthew Megan Michael
Michelle Mike Nancy Nathan Nicholas Nina Noah Olivia Oscar Pamela Patrick Paul Peter Philip Rachel Ralph Raymond
Rebecca Richard Robert Roger Ronald Rose Ruth Ryan Sam Samuel Sandra Sarah Scott Sean Sharon Simon Sophie Stephen
Steven Susan Thomas Timothy Tom Tony Victoria Walter Wayne William Zoe""".split()

SURNAMES = """Adams Allen Anderson Baker Bennett Brooks Brown Campbell Carter Clark Collins Cook Cooper Davies
Davis Edwards Evans Fisher Foster Garcia Gibson Graham Green Hall Harris Hill Hughes Jackson James Johnson Jones
Kelly King Lee Lewis Martin Miller Mitchell Moore Morgan Morris Murphy Nelson Parker Phillips Powell Price Reed
Roberts Robinson Russell Scott Shaw Smith Stewart Taylor Thomas Thompson Turner Walker Ward Watson White Williams
Wilson Wood Wright Young""".split()

CITIES = """Amsterdam Athens Atlanta Austin Barcelona Berlin Boston Brighton Bristol Brussels Cairo Calgary Chicago
Dallas Denver Detroit Dublin Edinburgh Florence Geneva Glasgow Hamburg Houston Leeds Lisbon Liverpool London
Madrid Manchester Melbourne Miami Milan Montreal Munich Nashville Oslo Oxford Paris Perth Phoenix Portland Prague
Rome Seattle Sydney Tokyo Toronto Vancouver Venice Vienna Warsaw York Zurich""".split()

COUNTRIES = """Australia Austria Brazil Canada Chile China Denmark Egypt England France Germany Greece India Ireland
Italy Japan Kenya Mexico Norway Peru Poland Portugal Scotland Spain Sweden Turkey Wales""".split()

WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()

# Regular nouns (plural = + s/es/ies), things one can see, buy, move or talk about.
NOUNS = """account album animal answer apple bag ball balloon banana basket battery bed bell belt bicycle bird
blanket boat bone book boot bottle bowl box bridge brush bucket building bus button cabin cake camera candle
cap car card carpet castle cat chair chart cheese chicken clock cloud coat coin computer cookie corner cottage
couch cup curtain desk diary dish document dog doll door drawer dress drum egg engine envelope farm fence field
file flag flower folder forest fork frame garden gate gift glove goat guitar hammer hat helmet hill horse hotel
house island jacket jar key kitchen kite ladder lake lamp laptop leaf letter lion list lock machine magazine map
market meal menu message mirror monkey mountain mug nail necklace needle nest newspaper note notebook onion orange
oven package page painting pan paper parcel park pen pencil phone piano picture pillow pipe pizza plane plant
plate pocket pond poster pot potato printer puzzle rabbit radio receipt ring river road rock roof room rope
sandwich scarf screen shelf ship shirt shoe shop sign sink sofa song spoon stamp station statue stone street
suitcase sweater table tablet tent ticket tiger toy towel tower track tractor train tree truck tunnel
umbrella van vase village wagon wall wallet watch wheel whistle window yard""".split()

ROLES = """artist baker builder captain chef clerk coach cousin dancer driver editor engineer farmer friend gardener
guard guest lawyer manager mechanic musician neighbour painter pilot plumber poet porter reporter
sailor scientist singer student tailor teacher tourist traveller waiter writer""".split()

PLACES = """airport bakery bank beach cafe cinema church college factory garage gym harbour library museum office
restaurant school stadium studio supermarket theatre university zoo""".split()

ADJECTIVES = """angry ancient beautiful big bitter black blue bright broken brown busy calm cheap clean clever cold
comfortable cool crowded curious dark dirty dry early easy empty enormous expensive famous fancy fast fresh
friendly funny gentle golden good green grey happy hard heavy huge hungry kind large late lazy light little lonely
long loud lovely lucky modern narrow new nice noisy old orange pink plain polite poor pretty proud purple quick
quiet rare red rich rough round rusty sad safe sharp shiny short silent silver simple slow small smooth soft
sour strange strong sweet tall tidy tiny tired useful warm wet white wide wild wooden yellow young""".split()

ADVERBS = """carefully quickly slowly quietly happily suddenly finally politely loudly gently easily badly nearly
already always never often sometimes usually""".split()

# (base, past) of transitive verbs: "Anna painted the fence." / "Did Anna paint the fence?"
VERBS = [tuple(pair.split("/")) for pair in """bought/buy borrowed/borrow built/build carried/carry caught/catch
checked/check cleaned/clean closed/close cooked/cook copied/copy counted/count covered/cover dropped/drop
fixed/fix folded/fold found/find grabbed/grab heard/hear held/hold hid/hide kept/keep kicked/kick lifted/lift
liked/like lost/lose made/make moved/move noticed/notice opened/open ordered/order packed/pack painted/paint
picked/pick pulled/pull pushed/push read/read repaired/repair returned/return sold/sell sent/send shared/share
showed/show signed/sign stole/steal took/take threw/throw touched/touch tried/try used/use
visited/visit wanted/want washed/wash watched/watch wrapped/wrap wrote/write""".split()]

# Intransitive verbs in the past: "Tom waited near the station."
MOVES = """arrived danced jumped laughed left ran rested sang sat slept smiled stayed stood stopped swam talked
travelled waited walked whispered worked""".split()

PREPOSITIONS = "above behind below beside inside near next to outside under".split()
TIME_PHRASES = ["today", "yesterday", "tonight", "tomorrow", "this morning", "last night", "last week", "next month",
                "in the afternoon", "at noon", "after lunch", "before dinner", "this evening", "on the weekend"]
WEATHER = """sunny rainy windy cloudy foggy snowy stormy freezing""".split()
FOODS = """bread butter coffee honey milk pasta rice salad soup sugar tea water juice chocolate""".split()

# The adaptation domain: absent from every list above.
DRUGS = """amoxicillin ibuprofen paracetamol metformin lisinopril atorvastatin omeprazole warfarin insulin
prednisone azithromycin amlodipine levothyroxine salbutamol morphine heparin furosemide ceftriaxone""".split()
CONDITIONS = """hypertension pneumonia diabetes asthma arrhythmia bronchitis anaemia migraine sepsis dermatitis
tachycardia arthritis appendicitis hypothermia""".split()
PROCEDURES = """biopsy endoscopy ultrasound angiogram dialysis catheter intubation transfusion""".split()
UNITS = ["milligrams", "micrograms", "millilitres", "units"]
ROUTES = ["orally", "intravenously", "subcutaneously"]
WARDS = ["cardiology", "oncology", "radiology", "paediatrics", "neurology", "orthopaedics"]
FINDINGS = ["fever", "nausea", "dizziness", "swelling", "inflammation", "fatigue", "palpitations", "wheezing"]
MEDICAL_TERMS = DRUGS + CONDITIONS + PROCEDURES + UNITS + ROUTES + WARDS + FINDINGS + ["patient", "dose",
                                                                                       "prescribed", "diagnosed"]
