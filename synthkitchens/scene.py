"""SynthKitchens scene model: the objects, the counter layout, the actions and both hands' motion.

A video is a static top-down camera over a counter with 5-6 distinct, nameable objects and two
hands; a scene is a pure function of ``(seed, video_index)`` (``sample_scene``) and its hands
move continuously in time, so the MP4, the 60-fps rgb_frames and the labels show one motion.

Why language matters: each action's target is drawn uniformly among the objects in view, and the
hands only wander during the observation window; only in the last second before contact does the
active hand reach for the target. Told which object is meant (the narration, or an RBHP question
that implies it), a predictor can aim at it; from the frames alone it cannot know which. Objects
layout decides where they lie (``LAYOUTS``): ``fitted`` puts each class near a fixed spot
(``KITCHEN_LAYOUT_PX``), so the question also says roughly where the hand goes and the frames tell
where it starts and the exact spot; ``random`` puts fewer, larger objects anywhere on the counter
and rests the hands at its front between reaches (``HAND_MOTION``), so the question names (or
implies) the object and only the frames say where it is.

Pixels of the 456x256 frame (x right, y down) unless a name ends in ``_norm``; times in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from handsonvlm.constants import ANTICIPATION_SECONDS, EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH, HOI_FORECAST_SIDES
from preprocessing.window import REFERENCE_FPS

# ----------------------------------------------------------------------------------------------
# Tuned constants: what depends on them
# ----------------------------------------------------------------------------------------------
# The layout spots and jitter (KITCHEN_LAYOUT_PX, LAYOUT_JITTER_PX, after the vocabulary), the
# hands' wander and home spots, the bimanual and question probabilities and the action and reach
# timing below were tuned together. Changing any of them changes the data of every seed, and
# with it the numbers these check:
#   * tests/test_synthkitchens.py: test_language_matters (seed 0, 8 videos, 24 validation
#     actions: text oracle <= 0.35x, text-free oracle >= 0.85x and question only <= 0.6x the
#     constant-velocity ADE, shuffled question >= 2x question only),
#     test_observation_window_does_not_reveal_the_target (|observation approach| < 3 px,
#     anticipation approach > 30 px), test_question_rates_and_unique_purposes (80-97 % of the
#     clips have questions), test_objects_lie_near_their_layout_spots (LAYOUT_JITTER_PX),
#     test_objects_inside_the_centre_crop (5-6 objects inside ACTIVE_REGION_PX);
#   * tests/test_synthkitchens.py, random layout (RANDOM_* below): the tower tells the classes
#     apart (test_random_layout_objects_are_distinct_to_the_tower) and the reference predictors
#     (test_random_layout_places_fewer_larger_objects_anywhere);
#   * tests/test_demo_learns.py: `make demo` (random layout, seed 0, 48 videos) must train the demo
#     model to at most 0.6x the constant-velocity ADE, with shuffled questions at least 1.5x and
#     shuffled frames at least 1.3x worse;
#   * tests/test_evaluate.py, through tests/conftest.py's synth_data (seed 0, 3 videos x 4
#     actions: 2 train shards + 1 validation shard, with RBHP questions on some clips);
#   * the numbers quoted in docs/DATA.md (the language_gap_report table: seed 0, 8 / 24 / 48
#     videos) and in README.md (the demo's metrics table).

# ----------------------------------------------------------------------------------------------
# Frame geometry
# ----------------------------------------------------------------------------------------------
# Everything that matters lies inside this box (normalised x0, y0, x1, y1). The model centre-crops
# the middle 256x256 (x in [0.219, 0.781]), so the box is comfortably inside the crop.
ACTIVE_REGION_NORM = (0.27, 0.15, 0.73, 0.75)
ACTIVE_REGION_PX = (
    ACTIVE_REGION_NORM[0] * EPIC_FRAME_WIDTH,
    ACTIVE_REGION_NORM[1] * EPIC_FRAME_HEIGHT,
    ACTIVE_REGION_NORM[2] * EPIC_FRAME_WIDTH,
    ACTIVE_REGION_NORM[3] * EPIC_FRAME_HEIGHT,
)

# ----------------------------------------------------------------------------------------------
# Timing of actions (seconds)
# ----------------------------------------------------------------------------------------------
OBS_WINDOW_LEAD_S = 3.25  # the observation window starts 3.25 s before the action start
OBS_WINDOW_SAFETY_S = 0.05  # margin for the float32 index quirk of window.observation_frame_indices
FIRST_ACTION_MIN_S = 3.5  # no action starts earlier (its whole window then lies in the video)
INTER_ACTION_GAP_S = (0.2, 1.0)  # extra wander time between an action's end and the next window
ACTION_DURATION_S = (0.5, 1.5)  # stop - start
NARRATION_LEAD_S = (0.1, 1.2)  # the narrator speaks shortly before the action starts
VIDEO_TAIL_S = (1.0, 2.0)  # wander time after the last action
REACH_S = ANTICIPATION_SECONDS  # the reach takes exactly the anticipation second
CENTISECONDS = 100  # start/stop timestamps have two decimals, like EPIC

# ----------------------------------------------------------------------------------------------
# Hand motion
# ----------------------------------------------------------------------------------------------
WANDER_SEGMENT_S = (0.6, 1.0)  # duration of one minimum-jerk wander move
WANDER_STEP_PX = (6.0, 24.0)  # length of one wander move (before the pull toward home)
WANDER_PAUSE_PROB = 0.25  # probability that a wander "move" is a pause in place
# Each hand wanders over the active region, the right hand biased right and the left hand left
# (normalised x range per side; y uses the full active-region range). Every move also reverts
# WANDER_REVERSION of the way toward the hand's resting "home", so the hands spend most of their
# time near the middle of the object layout: knowing where the objects are (but not which one is
# meant) then says little about where a hand goes next.
HAND_WANDER_X_NORM = {"RIGHT": (0.36, 0.73), "LEFT": (0.27, 0.64)}
HAND_HOME_NORM = {"RIGHT": (0.56, 0.47), "LEFT": (0.44, 0.47)}
WANDER_REVERSION = 0.3
# The random layout's hands rest at the front of the counter, below the objects, and only fidget
# there between reaches (a small box around home, short steps, a strong pull home: the first move
# after letting go of an object goes back into the box). Where a hand starts is then about known;
# where it goes is the named object, which only the frames locate.
RANDOM_HAND_HOME_NORM = {"RIGHT": (0.60, 0.84), "LEFT": (0.40, 0.84)}
RANDOM_HAND_BOX_HALF_NORM = (0.04, 0.04)  # the wander box: home +- these (x, y)
RANDOM_WANDER_STEP_PX = (2.0, 8.0)
RANDOM_WANDER_REVERSION = 0.5
BIMANUAL_PROB = 0.15  # both hands reach the object's left/right edges
QUESTION_PROBS = (0.1, 0.3)  # P(no RBHP question), P(one question); otherwise three questions
GRASP_DEPTH = 0.35  # unimanual grasp point: this fraction of the half-size from the centre
BIMANUAL_EDGE_DEPTH = 0.8  # bimanual grasp points: this fraction of the half-width
GRASP_JITTER_PX = 2.0
HOLD_WIGGLE_PX = (1.0, 4.0)  # small manipulation motion while holding the object
CONTACT_POINTS = (1, 5)  # number of affordance contact points (inclusive range)
CONTACT_POINT_SPREAD_PX = 4.0

# ----------------------------------------------------------------------------------------------
# Appearance drawn per video (the drawing itself is synthkitchens.render)
# ----------------------------------------------------------------------------------------------
COUNTER_COLOURS_BGR = (  # muted counter tops that contrast with white plates and black pans
    (118, 112, 104),
    (128, 136, 140),
    (96, 112, 110),
    (140, 128, 118),
    (110, 118, 128),
    (92, 98, 104),
)
COUNTER_JITTER = 8  # per-channel colour jitter of the counter
SKIN_BGR = (128, 164, 214)
SKIN_JITTER = 12
SLEEVE_COLOURS_BGR = ((90, 45, 25), (40, 30, 120), (40, 90, 35), (55, 55, 55), (120, 90, 60))
HAND_AXES_PX = (13.0, 17.0)  # palm ellipse half-width, half-length (length along the forearm)
# Elbow anchors below the frame: the right arm enters bottom-right, the left arm bottom-left.
ARM_ANCHOR_NORM = {"RIGHT": (0.80, 1.25), "LEFT": (0.20, 1.25)}

# ----------------------------------------------------------------------------------------------
# Vocabulary: real EPIC-KITCHENS-100 class ids, keys, categories (EPIC_100_{verb,noun}_classes.csv)
# ----------------------------------------------------------------------------------------------
VERB_CLASSES = {  # key -> (id, category, a few of the real instances)
    "take": (0, "retrieve", ["take", "grab", "pick-up", "get", "fetch"]),
    "put": (1, "leave", ["put", "place", "put-down", "lay", "set-down"]),
    "open": (3, "access", ["open", "open-up", "uncork", "lever-open"]),
    "fill": (26, "merge", ["fill", "fill-up", "fill-from", "fill-with"]),
}
NOUN_CLASSES = {  # key -> (id, category, a few of the real instances)
    "plate": (2, "crockery", ["plate", "plate:pasta", "saucer", "dish"]),
    "knife": (4, "cutlery", ["knife", "knife:mincing", "blade", "chopper"]),
    "pan": (5, "cookware", ["pan", "pan:sauce", "pan:frying", "saucepan", "wok"]),
    "bowl": (7, "crockery", ["bowl", "bowl:salad", "bowl:glass", "bowl:sugar"]),
    "sponge": (9, "cleaning equipment and material", ["sponge", "scrubber", "sponge:cleaning", "scourer"]),
    "cup": (13, "crockery", ["cup", "cup:coffee", "cup:small", "mug", "mug:tea"]),
    "bottle": (15, "containers", ["bottle", "bottle:oil", "bottle:milk", "bottle:water"]),
    "board:chopping": (18, "utensils", ["board:chopping", "board:cutting", "board", "block:chopping"]),
    "jar": (40, "containers", ["jar", "jar:sugar", "jar:coffee", "jar:honey"]),
    "kettle": (44, "appliances", ["kettle", "spout:kettle", "boiler", "kettle:electronic"]),
    "towel": (52, "materials", ["towel", "towel:tea", "towel:cleaning", "duster"]),
}


@dataclass(frozen=True)
class ObjectKind:
    """One entry of the SynthKitchens vocabulary.

    ``purposes`` are (infinitive, gerund) phrases that imply the object without naming it; they
    fill the three RBHP question stems. Every phrase is unique across the vocabulary.
    ``half_size_px`` is the half width/height of the object's axis-aligned footprint.
    """

    noun: str
    verb: str
    narration: str
    paraphrase: str
    purposes: tuple[tuple[str, str], ...]
    half_size_px: tuple[int, int]
    colour_bgr: tuple[int, int, int]


VOCABULARY: dict[str, ObjectKind] = {
    k.noun: k
    for k in (
        ObjectKind(
            "cup", "take", "take cup", "pick up the mug",
            (("have a drink", "getting something to drink"),
             ("sip something hot", "sipping something hot"),
             ("quench my thirst", "quenching my thirst")),
            (20, 13), (35, 35, 200),  # red circle with a handle on the right
        ),
        ObjectKind(
            "plate", "put", "put plate", "set down the dinner dish",
            (("serve dinner", "serving dinner"),
             ("set the table", "setting the table"),
             ("dish up a meal", "dishing up a meal")),
            (26, 26), (238, 238, 238),  # large white disc with a rim
        ),
        ObjectKind(
            "knife", "take", "take knife", "grab the blade",
            (("cut the vegetables", "cutting the vegetables"),
             ("slice some bread", "slicing some bread"),
             ("dice the ingredients", "dicing the ingredients")),
            (31, 5), (185, 185, 190),  # thin grey blade with a dark handle
        ),
        ObjectKind(
            "pan", "take", "take pan", "get the frying pan",
            (("fry an egg", "frying an egg"),
             ("cook something on the stove", "cooking something on the stove"),
             ("sauté some onions", "sautéing some onions")),
            (33, 21), (32, 32, 32),  # black disc with a handle on the right
        ),
        ObjectKind(
            "bottle", "open", "open bottle", "unscrew the bottle",
            (("pour out some sauce", "pouring out some sauce"),
             ("twist off a cap", "twisting off a cap"),
             ("add a splash of vinegar", "adding a splash of vinegar")),
            (8, 26), (50, 150, 40),  # tall green rectangle with a neck and cap
        ),
        ObjectKind(
            "sponge", "take", "take sponge", "pick up the scrubber",
            (("scrub the dishes", "scrubbing the dishes"),
             ("wipe the counter", "wiping the counter"),
             ("clean up a spill", "cleaning up a spill")),
            (16, 11), (40, 215, 245),  # yellow block with a green scouring strip
        ),
        ObjectKind(
            "bowl", "take", "take bowl", "grab the bowl",
            (("eat some cereal", "eating some cereal"),
             ("mix the batter", "mixing the batter"),
             ("serve some soup", "serving some soup")),
            (19, 19), (190, 100, 25),  # blue disc with a light inner ring
        ),
        ObjectKind(
            "kettle", "fill", "fill kettle", "top up the kettle with water",
            (("boil some water", "boiling some water"),
             ("make tea", "making tea"),
             ("heat water for coffee", "heating water for coffee")),
            (25, 18), (20, 120, 240),  # orange round body with a spout and a handle
        ),
        ObjectKind(
            "jar", "open", "open jar", "unscrew the jar",
            (("get some jam", "getting some jam"),
             ("spread honey on toast", "spreading honey on toast"),
             ("reach the pickles", "reaching the pickles")),
            (12, 15), (150, 50, 130),  # purple square with a golden lid
        ),
        ObjectKind(
            "board:chopping", "take", "take chopping board", "pick up the cutting board",
            (("set up my food prep area", "setting up my food prep area"),
             ("get a wooden surface to work on", "getting a wooden surface to work on"),
             ("lay out a prep surface", "laying out a prep surface")),
            (29, 18), (45, 95, 150),  # large brown wooden rectangle with a hole
        ),
        ObjectKind(
            "towel", "take", "take towel", "grab the tea towel",
            (("dry my hands", "drying my hands"),
             ("wipe my wet hands", "wiping my wet hands"),
             ("dab off some water", "dabbing off some water")),
            (17, 11), (185, 135, 245),  # pink rectangle with white stripes
        ),
    )
}
OBJECTS_PER_VIDEO = (5, 6)  # inclusive
OBJECT_GAP_PX = 8  # minimum free space between object footprints
PLACEMENT_TRIES = 400
# The SynthKitchens counter has a fixed layout, like a fitted kitchen where the kettle, the pans
# and the chopping board each have their usual place: every object class has a home spot (centre,
# px) and an instance lies within LAYOUT_JITTER_PX of it. Which objects are out differs per video.
# A fixed layout is what makes the question informative on its own: the noun it names (or
# implies) says roughly where the hand will go, and the frames refine the exact spot and tell
# where the hand starts. Without it, a tiny model would have to find a named colour in the
# pooled patch grid before the question could help, which it does not learn in a CPU demo.
KITCHEN_LAYOUT_PX = {  # three rows: back (appliances, tall things), middle, front
    "bottle": (140.0, 70.0),
    "kettle": (192.0, 62.0),
    "jar": (238.0, 60.0),
    "pan": (296.0, 64.0),
    "knife": (158.0, 120.0),
    "bowl": (215.0, 118.0),
    "cup": (264.0, 116.0),
    "towel": (312.0, 118.0),
    "plate": (155.0, 163.0),
    "board:chopping": (222.0, 170.0),
    "sponge": (290.0, 168.0),
}
LAYOUT_JITTER_PX = 8.0  # tuned with the spots: see "Tuned constants" at the top

# The random layout ("objects anywhere"): a video's objects lie uniformly on the counter part of
# the model's centre crop, without overlapping. What a frozen ImageNet CNN must resolve is sized to
# its 7 x 7 grid at 224 px (one cell = 32 px of the 224-px crop of the 256-px frame height, about
# 37 frame px): objects are drawn RANDOM_OBJECT_SCALE times the fitted size (the smallest, the
# bottle and the knife's width aside, then span about one cell) and there are fewer of them, so
# that a pooled 2 x 2-cell slow token mostly holds one object. tests/test_synthkitchens.py checks
# that pooled tower features tell the classes apart (test_random_layout_objects_are_distinct_to_the_tower).
LAYOUTS = ("fitted", "random")
DEFAULT_LAYOUT = "fitted"
RANDOM_OBJECT_SCALE = 1.5
RANDOM_OBJECTS_PER_VIDEO = (3, 4)  # inclusive
RANDOM_COUNTER_REGION_NORM = (0.25, 0.12, 0.75, 0.70)  # inside the centre crop, below the backsplash, above the hands
RANDOM_COUNTER_REGION_PX = tuple(v * size for v, size in zip(
    RANDOM_COUNTER_REGION_NORM, (EPIC_FRAME_WIDTH, EPIC_FRAME_HEIGHT) * 2))


# ----------------------------------------------------------------------------------------------
# Scene data
# ----------------------------------------------------------------------------------------------
@dataclass
class PlacedObject:
    """An object instance: ``centre`` (x, y) px, footprint ``half`` (w, h) px, drawn ``scale``
    times the vocabulary's size (``half`` is the scaled footprint)."""

    noun: str
    centre: tuple[float, float]
    half: tuple[int, int]
    scale: float = 1.0

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Footprint xyxy (px, integer)."""
        cx, cy = self.centre
        hw, hh = self.half
        return (int(round(cx - hw)), int(round(cy - hh)), int(round(cx + hw)), int(round(cy + hh)))


@dataclass
class Track:
    """Piecewise quintic motion of one hand.

    Segment ``i`` is valid from ``starts[i]`` to ``starts[i + 1]`` (the last one forever) and is
    ``p(t) = sum_k coeffs[i, k] * tau**k`` with ``tau = (t - origins[i]) / durations[i]``.
    Shapes: ``starts``, ``origins``, ``durations`` [S]; ``coeffs`` [S, 6, 2].
    """

    starts: list[float] = field(default_factory=list)
    origins: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    coeffs: list[np.ndarray] = field(default_factory=list)

    def append(self, t0: float, duration: float, coeffs: np.ndarray) -> None:
        """Add a segment starting at ``t0`` (s) with nominal ``duration`` and coefficients [6, 2]."""
        self.starts.append(float(t0))
        self.origins.append(float(t0))
        self.durations.append(float(duration))
        self.coeffs.append(np.asarray(coeffs, dtype=np.float64))

    @property
    def end_time(self) -> float:
        """End of the last segment's nominal duration (the hand is at rest there)."""
        return self.origins[-1] + self.durations[-1]

    def truncate_at(self, t: float) -> None:
        """Drop every segment that starts after ``t`` (the segment containing ``t`` stays)."""
        while len(self.starts) > 1 and self.starts[-1] > t:
            for seq in (self.starts, self.origins, self.durations, self.coeffs):
                seq.pop()

    def state(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Position, velocity (px/s) and acceleration (px/s^2) at time ``t``, each [2]."""
        i = max(0, int(np.searchsorted(np.asarray(self.starts), t, side="right")) - 1)
        c, d = self.coeffs[i], self.durations[i]
        tau = min(max((t - self.origins[i]) / d, 0.0), 1.0)
        powers = tau ** np.arange(6)
        pos = powers @ c
        vel = (np.arange(1, 6) * powers[:5]) @ c[1:] / d
        acc = (np.arange(2, 6) * np.arange(1, 5) * powers[:4]) @ c[2:] / d**2
        return pos, vel, acc

    def positions(self, times) -> np.ndarray:
        """Positions at many times: ``times`` [N] s -> float64 [N, 2] px."""
        times = np.asarray(times, dtype=np.float64)
        idx = np.clip(np.searchsorted(np.asarray(self.starts), times, side="right") - 1, 0, None)
        origins = np.asarray(self.origins)[idx]
        durations = np.asarray(self.durations)[idx]
        tau = np.clip((times - origins) / durations, 0.0, 1.0)
        powers = tau[:, None] ** np.arange(6)[None, :]  # [N, 6]
        coeffs = np.stack(self.coeffs)[idx]  # [N, 6, 2]
        return np.einsum("nk,nkd->nd", powers, coeffs)


def quintic_to_rest(p0, v0, a0, p1, duration: float) -> np.ndarray:
    """Coefficients [6, 2] (in tau = t / duration) of the minimum-jerk-like quintic from state
    (p0, v0, a0) to rest at p1 (zero velocity and acceleration). With v0 = a0 = 0 this is the
    classic minimum-jerk profile ``p0 + (p1 - p0) (10 tau^3 - 15 tau^4 + 6 tau^5)``."""
    p0, v0, a0, p1 = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (p0, v0, a0, p1)))
    delta = p1 - p0
    v, a = v0 * duration, a0 * duration**2
    return np.stack([
        p0,
        v,
        a / 2.0,
        10.0 * delta - 6.0 * v - 1.5 * a,
        -15.0 * delta + 8.0 * v + 1.5 * a,
        6.0 * delta - 3.0 * v - 0.5 * a,
    ])


def min_jerk_profile(tau) -> np.ndarray:
    """Fraction of the distance covered by a minimum-jerk move at normalised time ``tau``."""
    tau = np.clip(np.asarray(tau, dtype=np.float64), 0.0, 1.0)
    return tau**3 * (10.0 - 15.0 * tau + 6.0 * tau**2)


def centiseconds_to_frame(cs: int) -> int:
    """A two-decimal timestamp -> 60-fps rgb file number, like EPIC (00:00:49.15 -> 2949)."""
    return int(round(cs * REFERENCE_FPS / CENTISECONDS))


def frame_to_seconds(frame: int) -> float:
    """Time shown by a 60-fps rgb file number (file 1 is t = 0)."""
    return (frame - 1) / REFERENCE_FPS


@dataclass
class Action:
    """One annotated action. Times in seconds; frames are 60-fps rgb file numbers."""

    index: int  # 0-based, time order within the video
    target: int  # index into VideoScene.objects
    sides: tuple[str, ...]  # active hand(s)
    start_cs: int  # start timestamp in centiseconds
    stop_cs: int
    narration_ms: int  # narration timestamp in milliseconds
    grasp: dict[str, tuple[float, float]]  # side -> hand centre at contact (px)
    contact_points: list[tuple[float, float]]  # affordance select_points (px)
    hand_bbox: dict[str, tuple[int, int, int, int]]  # side -> palm xyxy at contact (px)
    question_purposes: list[int]  # indices into the object's purposes (0, 1 or 3 of them)

    @property
    def start_frame(self) -> int:
        return centiseconds_to_frame(self.start_cs)

    @property
    def stop_frame(self) -> int:
        return centiseconds_to_frame(self.stop_cs)

    @property
    def contact_time(self) -> float:
        """T_c = (start_frame - 1) / 60: the hand reaches the object at this time."""
        return frame_to_seconds(self.start_frame)

    @property
    def release_time(self) -> float:
        """The hand lets go (and resumes wandering) at (stop_frame - 1) / 60."""
        return frame_to_seconds(self.stop_frame)


@dataclass
class VideoScene:
    """Everything needed to render and annotate one video."""

    video_index: int
    participant_id: str
    video_id: str
    fps: float
    num_frames: int  # native-fps MP4 frames
    counter_bgr: tuple[int, int, int]
    skin_bgr: tuple[int, int, int]
    sleeve_bgr: tuple[int, int, int]
    texture_seed: int
    objects: list[PlacedObject]
    actions: list[Action]
    tracks: dict[str, Track]

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    @property
    def num_rgb_frames(self) -> int:
        """Frames an ``ffmpeg -r 60`` extraction yields: file n shows t = (n - 1) / 60."""
        return int(math.floor(self.duration * REFERENCE_FPS + 1e-9))

    def hand_positions(self, times) -> dict[str, np.ndarray]:
        """side -> float64 [N, 2] hand centres (px) at ``times`` [N] (s)."""
        return {side: self.tracks[side].positions(times) for side in HOI_FORECAST_SIDES}


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def _uniform(rng: np.random.Generator, bounds) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _overlaps(centre, half, placed: list[PlacedObject]) -> bool:
    """Whether a footprint (centre, half) comes within OBJECT_GAP_PX of any placed object's."""
    return not all(abs(centre[0] - o.centre[0]) >= half[0] + o.half[0] + OBJECT_GAP_PX
                   or abs(centre[1] - o.centre[1]) >= half[1] + o.half[1] + OBJECT_GAP_PX for o in placed)


def sample_objects_random(rng: np.random.Generator) -> list[PlacedObject]:
    """3-4 distinct objects, RANDOM_OBJECT_SCALE times their size, uniformly anywhere in
    RANDOM_COUNTER_REGION_NORM without overlapping (a set that does not fit is redrawn)."""
    x0, y0, x1, y1 = RANDOM_COUNTER_REGION_PX
    nouns = list(VOCABULARY)
    while True:
        count = int(rng.integers(RANDOM_OBJECTS_PER_VIDEO[0], RANDOM_OBJECTS_PER_VIDEO[1] + 1))
        chosen = [nouns[i] for i in rng.choice(len(nouns), size=count, replace=False)]
        placed: list[PlacedObject] = []
        for noun in chosen:
            hw, hh = (int(round(RANDOM_OBJECT_SCALE * h)) for h in VOCABULARY[noun].half_size_px)
            for _ in range(PLACEMENT_TRIES):
                centre = (round(float(rng.uniform(x0 + hw, x1 - hw)), 2),
                          round(float(rng.uniform(y0 + hh, y1 - hh)), 2))
                if not _overlaps(centre, (hw, hh), placed):
                    placed.append(PlacedObject(noun, centre, (hw, hh), RANDOM_OBJECT_SCALE))
                    break
        if len(placed) == count:
            return placed


def sample_objects(rng: np.random.Generator, layout: str = DEFAULT_LAYOUT) -> list[PlacedObject]:
    """A video's objects in ``layout`` (``LAYOUTS``).

    ``fitted``: 5-6 distinct objects near their KITCHEN_LAYOUT_PX spots, inside the active region
    and not overlapping (a draw whose jittered footprints collide is redrawn). ``random``:
    :func:`sample_objects_random`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "random":
        return sample_objects_random(rng)
    x0, y0, x1, y1 = ACTIVE_REGION_PX
    nouns = list(VOCABULARY)
    while True:
        count = int(rng.integers(OBJECTS_PER_VIDEO[0], OBJECTS_PER_VIDEO[1] + 1))
        chosen = [nouns[i] for i in rng.choice(len(nouns), size=count, replace=False)]
        for _ in range(PLACEMENT_TRIES):
            placed: list[PlacedObject] = []
            for noun in chosen:
                hw, hh = VOCABULARY[noun].half_size_px
                ax, ay = KITCHEN_LAYOUT_PX[noun]
                cx = float(np.clip(ax + rng.uniform(-LAYOUT_JITTER_PX, LAYOUT_JITTER_PX), x0 + hw, x1 - hw))
                cy = float(np.clip(ay + rng.uniform(-LAYOUT_JITTER_PX, LAYOUT_JITTER_PX), y0 + hh, y1 - hh))
                if not all(abs(cx - o.centre[0]) >= hw + o.half[0] + OBJECT_GAP_PX
                           or abs(cy - o.centre[1]) >= hh + o.half[1] + OBJECT_GAP_PX for o in placed):
                    break
                placed.append(PlacedObject(noun, (round(cx, 2), round(cy, 2)), (hw, hh)))
            if len(placed) == count:
                return placed
        # these objects' spots are too close to ever fit together: draw another set


@dataclass(frozen=True)
class HandMotion:
    """How the hands wander between reaches: per side the box (x0, y0, x1, y1 px) their waypoints
    stay in and their resting spot (px); the length of a move (px) and the pull toward home."""

    boxes: dict[str, tuple[float, float, float, float]]
    homes: dict[str, tuple[float, float]]
    step_px: tuple[float, float]
    reversion: float
    return_first: bool = False  # a hand outside its box (it let go of an object there) never pauses


def _px(norm) -> tuple[float, float]:
    return norm[0] * EPIC_FRAME_WIDTH, norm[1] * EPIC_FRAME_HEIGHT


HAND_MOTION = {
    "fitted": HandMotion(
        {side: (lo * EPIC_FRAME_WIDTH, ACTIVE_REGION_PX[1], hi * EPIC_FRAME_WIDTH, ACTIVE_REGION_PX[3])
         for side, (lo, hi) in HAND_WANDER_X_NORM.items()},
        {side: _px(home) for side, home in HAND_HOME_NORM.items()}, WANDER_STEP_PX, WANDER_REVERSION),
    "random": HandMotion(
        {side: (*_px((hx - RANDOM_HAND_BOX_HALF_NORM[0], hy - RANDOM_HAND_BOX_HALF_NORM[1])),
                *_px((hx + RANDOM_HAND_BOX_HALF_NORM[0], hy + RANDOM_HAND_BOX_HALF_NORM[1])))
         for side, (hx, hy) in RANDOM_HAND_HOME_NORM.items()},
        {side: _px(home) for side, home in RANDOM_HAND_HOME_NORM.items()}, RANDOM_WANDER_STEP_PX,
        RANDOM_WANDER_REVERSION, return_first=True),
}


def _wander_bounds(side: str, motion: HandMotion) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1 px) that one hand's wander waypoints stay in."""
    return motion.boxes[side]


def _reflect(value: float, lo: float, hi: float) -> float:
    """Mirror ``value`` back into [lo, hi]."""
    if value < lo:
        value = 2 * lo - value
    if value > hi:
        value = 2 * hi - value
    return min(max(value, lo), hi)


def _next_waypoint(rng: np.random.Generator, side: str, pos: np.ndarray, motion: HandMotion) -> np.ndarray:
    """A random wander waypoint near ``pos`` (a pause with probability WANDER_PAUSE_PROB)."""
    x0, y0, x1, y1 = _wander_bounds(side, motion)
    away = not (x0 <= pos[0] <= x1 and y0 <= pos[1] <= y1)
    if not (motion.return_first and away) and rng.random() < WANDER_PAUSE_PROB:
        return pos.copy()
    angle = rng.uniform(0.0, 2.0 * math.pi)
    step = _uniform(rng, motion.step_px)
    home = np.asarray(motion.homes[side])
    goal = pos + motion.reversion * (home - pos) + step * np.array([math.cos(angle), math.sin(angle)])
    return np.array([_reflect(goal[0], x0, x1), _reflect(goal[1], y0, y1)])


def _wander_until(rng: np.random.Generator, track: Track, side: str, t: float, motion: HandMotion) -> None:
    """Append wander moves until the track covers time ``t``."""
    while track.end_time < t:
        start = track.end_time
        pos = track.positions([start])[0]
        duration = _uniform(rng, WANDER_SEGMENT_S)
        goal = _next_waypoint(rng, side, pos, motion)
        track.append(start, duration, quintic_to_rest(pos, 0.0, 0.0, goal, duration))


def _start_track(rng: np.random.Generator, side: str, motion: HandMotion) -> Track:
    """A track that rests at a random point of the hand's wander box at t = 0."""
    x0, y0, x1, y1 = _wander_bounds(side, motion)
    pos = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
    track = Track()
    track.append(0.0, _uniform(rng, WANDER_SEGMENT_S), quintic_to_rest(pos, 0.0, 0.0, pos, 1.0))
    return track


def palm_geometry(side: str, centre) -> tuple[float, tuple[float, float]]:
    """Palm ellipse orientation (degrees, cv2 convention) and axis-aligned half extents (px)."""
    ax, ay = ARM_ANCHOR_NORM[side]
    dx, dy = centre[0] - ax * EPIC_FRAME_WIDTH, centre[1] - ay * EPIC_FRAME_HEIGHT
    theta = math.atan2(dy, dx) - math.pi / 2.0  # the ellipse's second (long) axis follows the arm
    a, b = HAND_AXES_PX
    half_w = math.hypot(a * math.cos(theta), b * math.sin(theta))
    half_h = math.hypot(a * math.sin(theta), b * math.cos(theta))
    return math.degrees(theta), (half_w, half_h)


def _hand_bbox(side: str, centre) -> tuple[int, int, int, int]:
    _, (half_w, half_h) = palm_geometry(side, centre)
    return (int(round(centre[0] - half_w)), int(round(centre[1] - half_h)),
            int(round(centre[0] + half_w)), int(round(centre[1] + half_h)))


def _grasp_points(rng: np.random.Generator, obj: PlacedObject, sides, starts) -> dict[str, np.ndarray]:
    """Where each active hand's centre ends up (px).

    Unimanual: inside the object, GRASP_DEPTH of the way from the centre toward the approaching
    hand. Bimanual: near the object's left (LEFT hand) and right (RIGHT hand) edges.
    """
    centre = np.asarray(obj.centre)
    half = np.asarray(obj.half, dtype=np.float64)
    points = {}
    for side in sides:
        if len(sides) == 2:
            sign = 1.0 if side == "RIGHT" else -1.0
            offset = np.array([sign * BIMANUAL_EDGE_DEPTH * half[0], 0.0])
        else:
            direction = starts[side] - centre
            direction = direction / max(float(np.linalg.norm(direction)), 1e-6)
            offset = GRASP_DEPTH * direction * half
        jitter = rng.uniform(-GRASP_JITTER_PX, GRASP_JITTER_PX, size=2)
        points[side] = np.clip(centre + offset + jitter, centre - half, centre + half)
    return points


def _contact_points(rng: np.random.Generator, obj: PlacedObject, grasp: dict[str, np.ndarray]) -> list:
    """1..5 affordance points (px) around the grasp point(s), inside the object's footprint."""
    count = int(rng.integers(max(CONTACT_POINTS[0], len(grasp)), CONTACT_POINTS[1] + 1))
    x0, y0, x1, y1 = obj.bbox
    sides = list(grasp)
    points = []
    for k in range(count):
        p = grasp[sides[k % len(sides)]] + rng.normal(0.0, CONTACT_POINT_SPREAD_PX, size=2)
        points.append((float(np.clip(p[0], x0, x1)), float(np.clip(p[1], y0, y1))))
    return points


def _add_reach_and_hold(rng: np.random.Generator, track: Track, t_reach: float,
                        t_contact: float, t_release: float, grasp: np.ndarray) -> None:
    """Replace the track after ``t_reach`` by: reach (continuous velocity) -> hold with a small
    manipulation wiggle -> rest at the grasp point at ``t_release``."""
    p0, v0, a0 = track.state(t_reach)
    track.truncate_at(t_reach)
    track.append(t_reach, t_contact - t_reach, quintic_to_rest(p0, v0, a0, grasp, t_contact - t_reach))
    half_hold = (t_release - t_contact) / 2.0
    angle = rng.uniform(0.0, 2.0 * math.pi)
    wiggle = grasp + _uniform(rng, HOLD_WIGGLE_PX) * np.array([math.cos(angle), math.sin(angle)])
    track.append(t_contact, half_hold, quintic_to_rest(grasp, 0.0, 0.0, wiggle, half_hold))
    track.append(t_contact + half_hold, half_hold, quintic_to_rest(wiggle, 0.0, 0.0, grasp, half_hold))


def _ceil_cs(seconds: float) -> int:
    return int(math.ceil(seconds * CENTISECONDS - 1e-9))


def sample_action_times(rng: np.random.Generator, count: int) -> list[tuple[int, int, int]]:
    """(start_cs, stop_cs, narration_ms) per action, in time order.

    Each action's observation window [T_c - 3.25, T_c - 1] starts after the previous action ended,
    so it only shows wandering hands.
    """
    times = []
    free_from = 0.0  # the previous action's release time
    for _ in range(count):
        earliest = free_from + OBS_WINDOW_LEAD_S + OBS_WINDOW_SAFETY_S + _uniform(rng, INTER_ACTION_GAP_S)
        start_cs = _ceil_cs(max(FIRST_ACTION_MIN_S, earliest))
        stop_cs = start_cs + _ceil_cs(_uniform(rng, ACTION_DURATION_S))
        narration_ms = max(0, int(round((start_cs / CENTISECONDS - _uniform(rng, NARRATION_LEAD_S)) * 1000)))
        times.append((start_cs, stop_cs, narration_ms))
        free_from = stop_cs / CENTISECONDS
    return times


def _question_purposes(rng: np.random.Generator, kind: ObjectKind, probs) -> list[int]:
    """Purposes for 0, 1 or 3 RBHP questions (probabilities ``probs`` = (none, one))."""
    draw = rng.random()
    order = [int(i) for i in rng.permutation(len(kind.purposes))]
    if draw < probs[0]:
        return []
    if draw < probs[0] + probs[1]:
        return order[:1]
    return order[:3]


def _active_sides(bimanual: bool, obj: PlacedObject, starts: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Both hands for a bimanual action, else the hand nearer to the object at reach start."""
    if bimanual:
        return HOI_FORECAST_SIDES
    return (min(HOI_FORECAST_SIDES, key=lambda s: float(np.linalg.norm(starts[s] - np.asarray(obj.centre)))),)


def sample_scene(seed: int, video_index: int, video_id: str, participant_id: str,
                 actions_per_video: int, fps: float, question_probs=QUESTION_PROBS,
                 layout: str = DEFAULT_LAYOUT) -> VideoScene:
    """Sample one video: layout, actions, both hands' motion. Deterministic in (seed, video_index).

    For every action (in time order) both hands first wander up to the reach start T_c - 1 s; the
    active hand(s) then reach the target during the last second, hold it until the release time
    and wander on. ``question_probs`` = (P(no RBHP question), P(one question)); else three.
    ``layout`` (``LAYOUTS``) places the objects (:func:`sample_objects`).
    """
    rng = np.random.default_rng([seed, video_index])
    counter = tuple(int(np.clip(c + rng.integers(-COUNTER_JITTER, COUNTER_JITTER + 1), 0, 255))
                    for c in COUNTER_COLOURS_BGR[int(rng.integers(len(COUNTER_COLOURS_BGR)))])
    skin = tuple(int(np.clip(c + rng.integers(-SKIN_JITTER, SKIN_JITTER + 1), 0, 255)) for c in SKIN_BGR)
    sleeve = SLEEVE_COLOURS_BGR[int(rng.integers(len(SLEEVE_COLOURS_BGR)))]
    texture_seed = int(rng.integers(2**31))
    objects = sample_objects(rng, layout)
    motion = HAND_MOTION[layout]
    tracks = {side: _start_track(rng, side, motion) for side in HOI_FORECAST_SIDES}

    actions = []
    for index, (start_cs, stop_cs, narration_ms) in enumerate(sample_action_times(rng, actions_per_video)):
        target = int(rng.integers(len(objects)))
        bimanual = rng.random() < BIMANUAL_PROB
        t_contact = frame_to_seconds(centiseconds_to_frame(start_cs))
        t_release = frame_to_seconds(centiseconds_to_frame(stop_cs))
        t_reach = t_contact - REACH_S
        for side in HOI_FORECAST_SIDES:
            _wander_until(rng, tracks[side], side, t_reach, motion)
        starts = {side: tracks[side].state(t_reach)[0] for side in HOI_FORECAST_SIDES}
        obj = objects[target]
        sides = _active_sides(bimanual, obj, starts)
        grasp = _grasp_points(rng, obj, sides, starts)
        for side in sides:
            _add_reach_and_hold(rng, tracks[side], t_reach, t_contact, t_release, grasp[side])
        actions.append(Action(
            index=index, target=target, sides=tuple(sides), start_cs=start_cs, stop_cs=stop_cs,
            narration_ms=narration_ms,
            grasp={s: (float(grasp[s][0]), float(grasp[s][1])) for s in sides},
            contact_points=_contact_points(rng, obj, grasp),
            hand_bbox={s: _hand_bbox(s, grasp[s]) for s in sides},
            question_purposes=_question_purposes(rng, VOCABULARY[obj.noun], question_probs),
        ))

    last_release = actions[-1].release_time if actions else 0.0
    duration = max(last_release, FIRST_ACTION_MIN_S) + _uniform(rng, VIDEO_TAIL_S)
    num_frames = int(math.ceil(duration * fps))
    for side in HOI_FORECAST_SIDES:
        _wander_until(rng, tracks[side], side, num_frames / fps + 1.0, motion)
    return VideoScene(video_index, participant_id, video_id, float(fps), num_frames, counter, skin,
                      sleeve, texture_seed, objects, actions, tracks)
