"""The robot world: Meta-World v3, a fast headless renderer, projection, experts, language, scenes.

A `World` wraps one task: seeded layouts, frames from a free (and the wrist) camera, exact projection,
the scripted expert, flat recolouring, coloured goal markers. Each task has a template, 2 paraphrases
and a held-out one. xyz in metres (x right of the robot, y away, z up); pixels (u, v), u right, v down.
"""
import ctypes.util, json, os, re, warnings
from dataclasses import dataclass

# MuJoCo picks its OpenGL backend on import: EGL (fast, headless), else OSMesa; MUJOCO_GL wins.
if "MUJOCO_GL" not in os.environ:
    if ctypes.util.find_library("EGL"):
        os.environ["MUJOCO_GL"] = "egl"
    elif ctypes.util.find_library("OSMesa"):
        os.environ["MUJOCO_GL"] = "osmesa"
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")

import mujoco, numpy as np  # noqa: E402
from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

# Known and harmless: Meta-World's experts warn at steps where their gains ask for more than the
# action range, which the environment clips.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high\. Environments clip response")

GL_HELP = ("headless OpenGL failed (MUJOCO_GL={gl}). Install the system libraries: "
           "`apt-get update && apt-get install -y libegl1 libgl1-mesa-dri` (EGL), or "
           "`apt-get install -y libosmesa6` and set MUJOCO_GL=osmesa. Cause: {err}")

# --- Language. tasks.json: task -> [object noun, template, paraphrase, paraphrase, held-out paraphrase].
# "{o}" becomes the object noun, with its colour word in front when the colour is varied.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks.json")) as f:
    TEXT = {task: (noun, texts) for task, (noun, *texts) in json.load(f).items()}
TASKS = sorted(TEXT)
# Tasks whose goal is a free point in space with nothing to show it: we draw a marker there.
FREE_GOAL = {"reach", "reach-wall", "push", "push-wall", "push-back", "pick-place",
             "pick-place-wall", "pick-out-of-hole", "coffee-pull", "coffee-push"}

def check_task(task: str) -> str:
    """Accept 'push' or 'push-v3'; anything else stops with the list of valid names."""
    name = task.removesuffix("-v3")
    if name not in TEXT:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return name

def instructions(task: str, color: str | None = None, split: str = "train", marker: str | None = None) -> list[str]:
    """'train' (template + 2 paraphrases), 'heldout' (1, never with actions) or 'all' texts; a grounded
    task's name the goal marker by its colour word."""
    noun, texts = MARKER_TEXT[task] if marker and task in MARKER_TEXT else TEXT[check_task(task)]
    obj = f"{color} {noun}" if color else noun
    out = [t.format(o=obj, m=marker) for t in texts]
    return {"train": out[:3], "heldout": out[3:], "all": out}[split]

# --- Scene variation: flat colours and camera jitter. -----------------------------------------
PALETTE = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.2), "blue": (0.1, 0.3, 0.9), "yellow": (0.95, 0.85, 0.1),
           "orange": (1.0, 0.5, 0.0), "purple": (0.55, 0.2, 0.75), "pink": (1.0, 0.45, 0.7), "cyan": (0.0, 0.8, 0.85),
           "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08), "gray": (0.5, 0.5, 0.5), "brown": (0.45, 0.28, 0.12)}
MARKER_RGBA = (0.1, 1.0, 0.1, 1.0)  # the single goal marker (no --variation.markers): bright green
# 6 cm, ~9 px wide at 64 px (Meta-World's site is 2 cm). Colour-to-place binding is what the tiny
# VLM learns slowest: held-out "where is the <colour> marker?" after 1,500 ETC steps named the right
# marker 0.47 of the time at 3.5 cm (5 px; chance 0.33) and 0.65 at 6 cm. A marker can hide the
# hand or puck that has reached it, inside the 5 cm success radius.
MARKER_RADIUS = 0.06
# The grounded tasks: K coloured markers, one the goal, named only by its colour ("{m}").
MARKER_TEXT = {
    "reach": ("puck", ["reach the {m} marker", "move the gripper to the {m} marker", "touch the {m} marker", "put your hand on the {m} dot"]),
    "push": ("puck", ["push the {o} to the {m} marker", "slide the {o} to the {m} marker", "move the {o} onto the {m} marker",
                      "nudge the {o} over to the {m} dot"]),
}
# Where markers go (x, y; z: the goal range's), apart by > 2 x the 5 cm success radius and by
# 3 cm more than a marker's width (in 95% of layouts their centres are >= 9 px apart at 64 px).
MARKER_REGION, MARKER_GAP = ((-0.2, 0.76), (0.2, 0.9)), 0.15

def parse_color(text: str) -> tuple[str, tuple[float, float, float]]:
    """'blue', 'r,g,b' (0-255 or 0-1) or 'name=r,g,b' -> (word, rgb in [0, 1]). A new word goes verbatim
    into instructions and ETC answers; a bare RGB is named after the nearest palette entry."""
    if text in PALETTE:
        return text, PALETTE[text]
    name, eq, values = text.rpartition("=")
    try:
        rgb = np.array([float(x) for x in values.split(",")])
        assert rgb.shape == (3,) and (rgb >= 0).all() and (rgb <= 255).all()
        assert not eq or re.fullmatch(r"[a-z][a-z -]*", name)  # a word: lower-case letters, spaces, hyphens
    except (ValueError, AssertionError):
        raise ValueError(f"unknown colour {text!r}: use a name ({', '.join(PALETTE)}), 'r,g,b' with values in "
                         "0-1 or 0-255, or a new word with its colour, 'name=r,g,b' (e.g. teal=0,0.5,0.5)") from None
    rgb = rgb / 255.0 if rgb.max() > 1.0 else rgb
    name = name or min(PALETTE, key=lambda k: np.sum((np.array(PALETTE[k]) - rgb) ** 2))
    return name, tuple(float(x) for x in rgb)

@dataclass(frozen=True)
class Variation:
    """A scene condition. None keeps Meta-World's own look."""
    object_color: str | None = None  # main object's colour: a palette name, "r,g,b" or "name=r,g,b"
    table_color: str | None = None  # table top colour, same forms
    camera_jitter: float = 0.0  # per-episode random camera offset, in degrees of azimuth
    markers: int = 0  # K coloured goal markers on the grounded tasks (MARKER_TEXT); 0 = one green goal
    marker_colors: tuple[str, ...] = ("green", "blue", "yellow", "purple", "orange", "pink")  # not the arm's red, the fingers' cyan
    goal_colors: tuple[str, ...] = ()  # the goal's colour comes from these (novel words); () = marker_colors
    ambiguous: float = 0.0  # chance that two markers share the named colour (the expert picks one, 50/50)

    def __post_init__(self):  # from meta.json the colours come back as lists
        object.__setattr__(self, "marker_colors", tuple(self.marker_colors))
        object.__setattr__(self, "goal_colors", tuple(self.goal_colors))

    def all_marker_colors(self) -> list[str]:
        return list(dict.fromkeys(self.goal_colors + self.marker_colors))

    def color_word(self) -> str | None:
        return parse_color(self.object_color)[0] if self.object_color else None

@dataclass(frozen=True)
class Camera:
    """A MuJoCo free camera; the defaults frame the whole workspace at 64 px."""
    lookat: tuple[float, float, float] = (0.0, 0.72, 0.08)  # close, from the front right, 45 degrees down:
    distance: float = 0.9  # the puck is 3-5 px wide and a marker ~9, none hidden by the arm
    azimuth: float = 150.0  # degrees about z
    elevation: float = -45.0  # degrees, negative looks down
    fovy: float = 45.0  # vertical field of view in degrees (Meta-World's model default)

def camera_pose(cam: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, forward, up) of a free camera, as MuJoCo's mjv_updateCamera builds them."""
    az, el = np.deg2rad(cam.azimuth), np.deg2rad(cam.elevation)
    forward = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    up = np.array([-np.sin(el) * np.cos(az), -np.sin(el) * np.sin(az), np.cos(el)])
    return np.asarray(cam.lookat) - cam.distance * forward, forward, up

def project(xyz: np.ndarray, cam: Camera, width: int, height: int) -> np.ndarray:
    """World points (..., 3) -> continuous pixel coordinates (..., 2), pinhole model:
    depth = (p - c).f,  u = W/2 + f_px (p - c).r / depth,  v = H/2 - f_px (p - c).up / depth,
    with r = f x up and f_px = (H/2) / tan(fovy/2) (OpenGL's symmetric frustum)."""
    pos, fwd, up = camera_pose(cam)
    right = np.cross(fwd, up)
    d = np.asarray(xyz, dtype=np.float64) - pos  # (..., 3)
    depth = d @ fwd
    f_px = 0.5 * height / np.tan(np.deg2rad(cam.fovy) / 2)
    u = 0.5 * width + f_px * (d @ right) / depth
    v = 0.5 * height - f_px * (d @ up) / depth
    return np.stack([u, v], axis=-1)

def jitter_camera(cam: Camera, degrees: float, rng: np.random.Generator) -> Camera:
    """A nearby view: azimuth +-deg, elevation +-deg/2, look-at +-5 mm per degree."""
    if degrees <= 0:
        return cam
    da, de = rng.uniform(-1, 1, 2) * (degrees, degrees / 2)
    shift = np.append(rng.uniform(-1, 1, 2) * 0.005 * degrees, 0.0)
    return Camera(tuple(np.asarray(cam.lookat) + shift), cam.distance,
                  cam.azimuth + da, cam.elevation + de, cam.fovy)

# --- The scene's bodies and geoms, and flat recolouring -----------------------------------------
def subtree(m: mujoco.MjModel, root: int) -> list[int]:
    """Body `root` and all bodies below it."""
    def ancestor(b):  # b's first ancestor that is root or the world
        while b > 0 and b != root:
            b = m.body_parentid[b]
        return b
    return [b for b in range(m.nbody) if ancestor(b) == root]

def visible_geoms(m: mujoco.MjModel, root: int) -> np.ndarray:
    """Visible geoms (groups 0-2, not transparent) of body `root` and its children."""
    bodies = subtree(m, root)
    return np.array([g for g in range(m.ngeom) if m.geom_group[g] < 3
                     and m.geom_rgba[g, 3] > 0 and m.geom_bodyid[g] in bodies], dtype=int)

def geoms_near(m: mujoco.MjModel, d: mujoco.MjData, point: np.ndarray) -> np.ndarray:
    """The object at `point`: the body of the nearest visible geom, with its children."""
    world = visible_geoms(m, 0)
    nearest = min(world[m.geom_bodyid[world] > 0], key=lambda g: np.linalg.norm(d.geom_xpos[g] - point))
    return visible_geoms(m, m.geom_bodyid[nearest])

def recolour(m: mujoco.MjModel, object_geoms: np.ndarray, var: Variation):
    """Flat colours: geom_rgba with the material unset (a material would tint it)."""
    if var.object_color:
        m.geom_rgba[object_geoms, :3], m.geom_matid[object_geoms] = parse_color(var.object_color)[1], -1
    if var.table_color:
        ids = [g for g in range(m.ngeom) if m.geom_bodyid[g] == m.body("tablelink").id]
        m.geom_rgba[ids, :3], m.geom_matid[ids] = parse_color(var.table_color)[1], -1

def grip_contact(m: mujoco.MjModel, d: mujoco.MjData, object_bodies: set, hand_bodies: set) -> int:
    """Gripper-object contact from MuJoCo: 0 none, 1 touching, 2 both finger pads on it."""
    touched = set()
    for a, b in zip(d.contact.geom1, d.contact.geom2):
        a, b = m.geom_bodyid[a], m.geom_bodyid[b]
        if b in object_bodies:
            a, b = b, a
        if a in object_bodies and b in hand_bodies:
            touched.add(m.body(b).name)
    return 2 if {"leftpad", "rightpad"} <= touched else int(bool(touched))

# --- Rendering ---------------------------------------------------------------------------------
def geom_box(m: mujoco.MjModel, d: mujoco.MjData, geoms: np.ndarray, cam: Camera, size: int) -> np.ndarray:
    """Pixel box [u1, v1, u2, v2] of some geoms: their bounding-box corners projected."""
    corners, signs = [], np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])
    for g in geoms:
        local = m.geom_aabb[g, :3] + m.geom_aabb[g, 3:] * signs  # (8, 3) in the geom frame
        corners.append(d.geom_xpos[g] + local @ d.geom_xmat[g].reshape(3, 3).T)
    uv = project(np.concatenate(corners), cam, size, size)
    return np.concatenate([uv.min(0), uv.max(0)]).clip(0, size)

class Renderer(mujoco.Renderer):
    """MuJoCo's offscreen renderer made fast for small frames: the buffer at image size, no multisampling,
    shadows, reflections or skybox (19 -> ~190 frames/s at 64 px, 10-15x gym's render()), every site
    hidden; the scene seen from a free camera with coloured spheres drawn in (the goal markers)."""
    def __init__(self, model: mujoco.MjModel, size: int, fovy: float):
        vis = model.vis
        vis.global_.offwidth = vis.global_.offheight = size
        vis.quality.offsamples, vis.global_.fovy = 0, fovy
        try:
            super().__init__(model, size, size)
        except Exception as err:  # the GL libraries are missing or broken
            raise RuntimeError(GL_HELP.format(gl=os.environ.get("MUJOCO_GL"), err=err)) from err
        for flag in ("mjRND_SHADOW", "mjRND_REFLECTION", "mjRND_SKYBOX"):
            self.scene.flags[getattr(mujoco.mjtRndFlag, flag)] = 0
        self.option = mujoco.MjvOption()
        self.option.sitegroup[:] = 0  # hide every site; markers are drawn by us
        self.free_cam = mujoco.MjvCamera()
        self.free_cam.type = mujoco.mjtCamera.mjCAMERA_FREE

    def view(self, d: mujoco.MjData, cam: "Camera | str", spheres: list = ()) -> np.ndarray:
        """(H, W, 3) uint8 from a free camera (or a named one) with (xyz, rgba) spheres drawn in."""
        if isinstance(cam, str):
            self.update_scene(d, cam, self.option)
        else:
            fc = self.free_cam
            fc.lookat[:], fc.distance, fc.azimuth, fc.elevation = cam.lookat, cam.distance, cam.azimuth, cam.elevation
            self.update_scene(d, fc, self.option)
        for xyz, rgba in spheres:
            self.draw_sphere(xyz, rgba)
        return self.render()

    def draw_sphere(self, xyz: np.ndarray, rgba: tuple, radius: float = MARKER_RADIUS):
        """Append a sphere to the scene: visible in the image, invisible to the physics."""
        scene = self.scene
        if scene.ngeom < scene.maxgeom:
            mujoco.mjv_initGeom(scene.geoms[scene.ngeom], mujoco.mjtGeom.mjGEOM_SPHERE, np.array([radius, 0, 0]),
                                np.asarray(xyz, float), np.eye(3).ravel(), np.array(rgba, dtype=np.float32))
            scene.ngeom += 1

# --- The grounded goal markers --------------------------------------------------------------------
def place_markers(var: Variation, rng: np.random.Generator, z: float, goal_index: int | None = None
                  ) -> tuple[np.ndarray, list[str], int]:
    """K markers (K, 3) at height z, MARKER_GAP apart in MARKER_REGION, distinct colours, the first the
    goal's (ambiguous: the second has its colour and the goal is either, 50/50); their colours; the
    goal's index (goal_index: the same layout with another marker named)."""
    (low, high), k = MARKER_REGION, var.markers
    if not 2 <= k <= len(var.marker_colors) + bool(var.goal_colors):
        raise ValueError(f"--variation.markers {k}: use 2 to {len(var.marker_colors)} (the marker colours given)")
    for _ in range(1000):
        xy = rng.uniform(low, high, (k, 2))
        if min(np.linalg.norm(a - b) for i, a in enumerate(xy) for b in xy[i + 1:]) >= MARKER_GAP:
            break
    else:
        raise ValueError(f"{k} markers do not fit {MARKER_GAP} m apart in {MARKER_REGION}; use fewer")
    goal = (var.goal_colors or var.marker_colors)[rng.integers(len(var.goal_colors or var.marker_colors))]
    others = [c for c in var.marker_colors if c != goal]
    ambiguous = rng.random() < var.ambiguous
    colors = [goal] + [goal] * ambiguous + list(map(str, rng.choice(others, k - 1 - ambiguous, replace=False)))
    named = int(rng.integers(2)) if ambiguous else 0
    if goal_index is not None and not (ambiguous and goal_index < 2):  # a twin named: the 50/50 pick stands
        named = goal_index % k  # the same markers, another one named
    return np.column_stack([xy, np.full(k, z)]), colors, named

# --- The world ------------------------------------------------------------------------------------
class World:
    """One Meta-World v3 task with a fast renderer. Not thread-safe; one per process."""
    def __init__(self, task: str, image_size: int = 64, variation: Variation = Variation(),
                 camera: Camera = Camera(), wrist: bool = False):
        self.task, self.size, self.variation, self.base_camera = check_task(task), image_size, variation, camera
        self.camera, self.wrist = camera, wrist
        env = ALL_V3_ENVIRONMENTS[f"{self.task}-v3"]()
        env._partially_observable = False  # goal-observable, and a fresh layout at every reset (below)
        if variation.markers and self.task in MARKER_TEXT:  # the observation clips the goal to this box
            (x0, y0), (x1, y1), g = *MARKER_REGION, env.goal_space
            env.goal_space = type(g)(np.minimum(g.low, (x0, y0, g.low[2])), np.maximum(g.high, (x1, y1, g.high[2])), dtype=g.dtype)
        del env.sawyer_observation_space
        env._set_task_called, env._freeze_rand_vec, env.seeded_rand_vec = True, False, True
        self.env, self.model, self.data = env, env.model, env.data
        self.expert = ENV_POLICY_MAP[f"{self.task}-v3"]()
        self.seed(0)  # a first layout, so the object geoms can be found
        m, hand = self.model, self.model.body("hand").id
        self.object_geoms = [geoms_near(m, self.data, p) for p in self.objects()]
        self.hand_geoms, self.hand_bodies = visible_geoms(m, hand), set(subtree(m, hand))
        self.object_bodies = set(subtree(m, m.geom_bodyid[self.object_geoms[0][0]]))
        recolour(self.model, self.object_geoms[0], variation)
        self.renderer = Renderer(self.model, image_size, camera.fovy)

    def seed(self, seed: int, goal: int | None = None) -> np.ndarray:
        """Reset to the layout (and camera jitter) that `seed` determines, marker `goal` the goal if given; returns the obs."""
        self.env.seed(seed)
        obs, _ = self.env.reset()
        # reset moves bodies through model.body_pos; forward so positions match at step 0
        mujoco.mj_forward(self.model, self.data)
        obs[:18] = obs[18:36] = self.env._prev_obs = self.env._get_curr_obs_combined_no_goal()
        self.obs, self.steps = obs, 0
        rng = np.random.default_rng([seed, 7])
        self.camera = jitter_camera(self.base_camera, self.variation.camera_jitter, rng)
        self.markers, self.marker_colors, self.marker_words, self.marker_rgb, self.goal_marker = np.zeros((0, 3)), [], (), (), -1
        if self.variation.markers and self.task in MARKER_TEXT:
            # One height (not Meta-World's random one): in one camera a sphere's height trades off against its distance.
            z = (self.env.goal_space.low + self.env.goal_space.high)[2] / 2 if self.task == "reach" else self.objects()[0, 2]
            self.markers, self.marker_colors, self.goal_marker = place_markers(self.variation, np.random.default_rng([seed, 11]), z, goal)
            self.marker_words, self.marker_rgb = zip(*(parse_color(c) for c in self.marker_colors))
            self.env._target_pos = self.markers[self.goal_marker].copy()
            self.model.site("goal").pos = self.env._target_pos
            self.obs[-3:] = self.env._target_pos  # the goal-observable expert reads it here
        return self.obs

    def step(self, action: np.ndarray) -> bool:
        """Apply an action in [-1, 1]^4 (dx, dy, dz, grip); Meta-World's success, or within 5 cm of the goal's twin."""
        self.obs, _, _, _, info = self.env.step(np.clip(action, -1.0, 1.0).astype(np.float32))
        self.steps += 1
        return bool(info["success"]) or bool(len(goals := self.goals()) and (self.distances()[goals] <= 0.05).any())

    def goals(self) -> list[int]:
        """The markers of the goal's colour: the goal, and its twin in an ambiguous layout."""
        return [i for i, w in enumerate(self.marker_words) if w == self.marker_words[self.goal_marker]] if len(self.markers) else []

    def distances(self, points: np.ndarray | None = None) -> np.ndarray:
        """(K,) distance of the hand (reach) or the object (push) to each marker (or to each of points)."""
        end = self.hand() if self.task == "reach" else self.objects()[0]
        return np.linalg.norm((self.markers if points is None else points) - end, axis=1)

    def expert_action(self) -> np.ndarray:
        obs = self.obs
        if self.task in ("reach", "reach-wall"):  # the expert steers the hand body, 4.5 cm above the
            obs = obs.copy()  # fingertips success is measured at: shifting its goal by that offset puts them on it
            obs[-3:] += obs[:3] - self.hand()
        return np.clip(self.expert.get_action(obs), -1.0, 1.0).astype(np.float32)

    def hand(self) -> np.ndarray:
        return self.env.tcp_center.copy()  # between the fingertips

    def gripper(self) -> float:
        return float(self.obs[3])  # finger distance / 0.1 m: 1 open, ~0 closed

    def contact(self) -> int:
        return grip_contact(self.model, self.data, self.object_bodies, self.hand_bodies)

    def objects(self) -> np.ndarray:
        return self.env._get_pos_objects().reshape(-1, 3).copy()  # (K, 3), K = 1 or 2

    def goal(self) -> np.ndarray:
        return self.env._target_pos.copy()

    def proprio(self) -> np.ndarray:
        return np.append(self.hand(), self.gripper()).astype(np.float32)  # (4,)

    def box(self, geoms: np.ndarray) -> np.ndarray:
        return geom_box(self.model, self.data, geoms, self.camera, self.size)

    def project(self, xyz: np.ndarray) -> np.ndarray:
        return project(xyz, self.camera, self.size, self.size)

    def nearest_marker(self) -> int:  # -1 without markers
        return int(np.argmin(self.distances())) if len(self.markers) else -1

    def between(self) -> bool | None:
        """Ambiguous layouts: whether the hand (reach) or object (push) is nearer the two goals'
        midpoint than either (what a regression that averages the two modes does); else None."""
        if len(alike := self.goals()) != 2:
            return None
        d = self.distances(np.vstack([self.markers[alike].mean(0), self.markers[alike]]))
        return bool(d[0] < d[1:].min())

    def instruction(self, mode: str = "right", split: str = "train") -> tuple[str, int]:
        """This layout's instruction and the marker it names: 'right' names the goal's colour,
        'wrong' another marker's, 'empty' nothing (the goal counts as named)."""
        named, words = self.goal_marker, self.marker_words
        if mode == "wrong" and len(self.markers):
            named = next(i for i, w in enumerate(words) if w != words[self.goal_marker])
        text = instructions(self.task, self.variation.color_word(), split, marker=words[named] if words else None)[0]
        return ("" if mode == "empty" else text), named

    def render(self) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 from the scene camera; with wrist=True also the wrist view."""
        spheres = [(xyz, (*rgb, 1.0)) for xyz, rgb in zip(self.markers, self.marker_rgb)]
        if self.task in FREE_GOAL and not len(self.markers):
            spheres.append((self.goal(), MARKER_RGBA))
        image = self.renderer.view(self.data, self.camera, spheres)
        return (image, self.renderer.view(self.data, "gripperPOV")) if self.wrist else image

    def close(self):
        self.renderer.close()
        self.env.close()
