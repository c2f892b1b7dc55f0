"""The world: projection, rendering, recolouring, instructions, experts."""
import warnings

import numpy as np
import pytest

import sim  # before mujoco: sim chooses MuJoCo's headless OpenGL backend, which is fixed at import

import mujoco  # noqa: E402, I001


@pytest.fixture(scope="module")
def world():
    w = sim.World("push", image_size=64)
    w.seed(3)
    yield w
    w.close()


def test_camera_pose_is_the_one_mujoco_renders_with(world):
    world.render()
    cams = world.renderer.scene.camera  # the two stereo eyes; mono renders their average
    gl = mujoco.mjv_averageCamera(cams[0], cams[1])
    pos, fwd, up = sim.camera_pose(world.camera)
    np.testing.assert_allclose(gl.pos, pos, atol=1e-5)
    np.testing.assert_allclose(gl.forward, fwd, atol=1e-5)
    np.testing.assert_allclose(gl.up, up, atol=1e-5)


@pytest.mark.parametrize("xyz", [(0.0, 0.7, 0.1), (-0.15, 0.85, 0.05), (0.12, 0.55, 0.25)])
def test_marker_lands_on_the_projected_pixel(world, xyz):
    """Render a small bright sphere at a known point; its pixels centre on project(xyz)."""
    world.render()  # places the free camera
    world.renderer.update_scene(world.data, world.renderer.free_cam, world.renderer.option)
    before = world.renderer.render().astype(int)
    g = world.renderer.scene.geoms[world.renderer.scene.ngeom]
    mujoco.mjv_initGeom(g, mujoco.mjtGeom.mjGEOM_SPHERE, np.array([0.012, 0, 0]), np.array(xyz),
                        np.eye(3).ravel(), np.array([1, 0, 1, 1], dtype=np.float32))
    world.renderer.scene.ngeom += 1
    after = world.renderer.render().astype(int)
    v, u = np.nonzero(np.abs(after - before).sum(-1) > 60)
    assert len(u) > 0, "the marker is not in the image"
    centre = np.array([u.mean() + 0.5, v.mean() + 0.5])  # pixel i covers [i, i+1)
    np.testing.assert_allclose(centre, world.project(np.array(xyz)), atol=0.5)  # measured <= 0.16


def test_projection_of_a_jittered_camera_matches_its_render():
    w = sim.World("reach", variation=sim.Variation(camera_jitter=6.0))
    try:
        w.seed(11)
        assert w.camera != sim.Camera()  # the jitter moved the camera
        w.render()
        gl = mujoco.mjv_averageCamera(w.renderer.scene.camera[0], w.renderer.scene.camera[1])
        np.testing.assert_allclose(gl.pos, sim.camera_pose(w.camera)[0], atol=1e-5)
    finally:
        w.close()


def test_goal_marker_is_drawn_where_the_goal_projects(world):
    img = world.render()
    u, v = world.project(world.goal()).astype(int)
    r, g, b = img[v, u].astype(int)
    assert g > 150 and g > r + 60 and g > b + 60, f"no green marker at the goal: {img[v, u]}"


@pytest.mark.parametrize("color", ["0,0,255", "navy=0,0,255"])
def test_recolouring_is_flat_and_visible(color):
    w = sim.World("push", variation=sim.Variation(object_color=color, table_color="white"))
    try:
        w.seed(3)
        assert (w.model.geom_matid[w.object_geoms[0]] == -1).all()
        img = w.render()
        u, v = w.project(w.objects()[0]).astype(int)
        r, g, b = img[v, u].astype(int)
        assert b > 100 and b > r + 50 and b > g + 50, img[v, u]
    finally:
        w.close()


def test_seeds_give_new_layouts_and_repeat_exactly():
    w = sim.World("pick-place")

    def layout(seed):
        w.seed(seed)
        return np.concatenate([w.objects()[0], w.goal()])
    try:
        layouts = [layout(s) for s in (1, 2, 1)]
    finally:
        w.close()
    assert not np.allclose(layouts[0], layouts[1])
    np.testing.assert_array_equal(layouts[0], layouts[2])


def test_image_sizes_and_wrist_view():
    for size in (84, 96, 128):
        w = sim.World("reach", image_size=size, wrist=size == 96)
        try:
            out = w.render()
            images = out if isinstance(out, tuple) else (out,)
            assert all(im.shape == (size, size, 3) and im.dtype == np.uint8 for im in images)
            assert len(images) == (2 if size == 96 else 1)
        finally:
            w.close()


def test_every_task_has_instructions_and_a_working_expert():
    """All 50 tasks: instruction splits and a scripted success on one of the first seeds."""
    assert len(sim.TASKS) == 50
    failed = []
    for task in sim.TASKS:
        tr, ho = sim.instructions(task, "red", "train"), sim.instructions(task, "red", "heldout")
        assert len(tr) == 3 and len(ho) == 1 and not set(tr) & set(ho)
        assert all(t and "{" not in t for t in tr + ho)
        w = sim.World(task, image_size=16)
        try:
            ok = False
            for seed in range(3):
                w.seed(seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ok = any(w.step(w.expert_action()) for _ in range(500))
                if ok:
                    break
        finally:
            w.close()
        if not ok:
            failed.append(task)
    assert not failed, f"experts failed on seeds 0-2: {failed}"


def test_colour_words_go_into_instructions():
    assert sim.instructions("push", "blue")[0] == "push the blue puck to the goal"
    assert sim.parse_color("250,10,10")[0] == "red"
    assert sim.parse_color("0.1,0.3,0.9") == ("blue", (0.1, 0.3, 0.9))
    assert sim.parse_color("teal=0,0.5,0.5") == ("teal", (0.0, 0.5, 0.5))  # a new word, verbatim
    assert sim.parse_color("sky blue=10,100,250")[0] == "sky blue"
    assert sim.instructions("push", sim.Variation(object_color="teal=0,128,128").color_word())[0] == "push the teal puck to the goal"


def test_bad_task_and_colour_name_the_fix():
    with pytest.raises(ValueError, match="valid tasks: assembly"):
        sim.check_task("pussh")
    assert sim.check_task("push-v3") == "push"
    for bad in ("blurple", "Teal=0,0,0", "teal=0,0", "=1,2,3"):
        with pytest.raises(ValueError, match="or a new word with its colour, 'name=r,g,b'"):
            sim.parse_color(bad)


# --- Coloured goal markers: the instruction names the goal only by its colour ----------------
def run_expert(w: sim.World, seed: int, max_steps: int = 300, goal: int | None = None) -> tuple[bool, int]:
    """One scripted episode: (success, index of the marker the hand (reach) or puck (push) ended nearest)."""
    w.seed(seed, goal)
    ok = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while w.steps < max_steps and not ok:
            ok = w.step(w.expert_action()) or ok
    end, dims = (w.hand(), 3) if w.task == "reach" else (w.objects()[0], 2)
    assert w.nearest_marker() == int(np.argmin(np.linalg.norm(w.markers[:, :dims] - end[:dims], axis=1)))
    return ok, w.nearest_marker()


CONDITIONS = dict(plain={}, ambiguous=dict(ambiguous=1.0), novel=dict(goal_colors=("teal=0,0.5,0.5", "lime=0.6,1,0.2")))


@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("task", ["reach", "push"])
def test_expert_goes_to_the_named_marker(task, condition):
    """>= 95% of 20 fresh layouts, each success at a marker of the named colour (either of two when ambiguous)."""
    w = sim.World(task, variation=sim.Variation(markers=3, **CONDITIONS[condition]))
    try:
        runs = []
        for s in range(20):
            ok, nearest = run_expert(w, 100 + s)
            runs.append((ok, nearest in w.goals(), w.goal_marker == 0 or condition == "ambiguous"))
        assert np.mean([ok for ok, _, _ in runs]) >= 0.95, runs
        assert all(named and first for ok, named, first in runs if ok)
    finally:
        w.close()


def test_markers_are_apart_distinct_and_named_in_the_instruction():
    w = sim.World("push", variation=sim.Variation(markers=3, marker_colors=("blue", "teal=0,0.5,0.5", "orange")))
    try:
        for s in range(10):
            w.seed(s)
            gaps = [np.linalg.norm(a[:2] - b[:2]) for i, a in enumerate(w.markers) for b in w.markers[i + 1:]]
            assert min(gaps) >= sim.MARKER_GAP and len(set(w.marker_words)) == 3
            assert np.allclose(w.goal(), w.markers[w.goal_marker]) and np.allclose(w.obs[-3:], w.goal())
            word = w.marker_words[w.goal_marker]
            assert all(f"{word} " in t for t in sim.instructions("push", None, "all", marker=word))
            if "teal" in w.marker_words:  # a new word: its RGB in the render, where the marker projects
                i = w.marker_words.index("teal")
                u, v = w.project(w.markers[i]).astype(int)
                r, g, b = w.render()[v, u].astype(int)
                assert g > r + 80 and b > r + 80 and abs(g - b) < 40, (r, g, b)  # teal's hue, lit
    finally:
        w.close()


def test_seed_can_name_another_marker_of_the_same_layout():
    """seed(s, goal=j): the same markers, marker j the goal, named in the instruction, and the expert goes there."""
    w = sim.World("reach", variation=sim.Variation(markers=3))
    try:
        w.seed(5)
        markers, words = w.markers.copy(), w.marker_words
        for j in range(3):
            w.seed(5, goal=j)
            assert np.allclose(w.markers, markers) and w.marker_words == words and w.goal_marker == j
            assert np.allclose(w.goal(), markers[j]) and f" {words[j]} marker" in w.instruction()[0]
            ok, nearest = run_expert(w, 5, goal=j)
            assert ok and nearest == j
    finally:
        w.close()


@pytest.mark.parametrize("task,markers", [("reach", 3), ("reach-wall", 0)])
def test_reach_experts_put_the_fingertips_on_the_goal(task, markers):
    """Meta-World's reach experts steer the hand body, 4.5 cm above the fingertips success is measured
    at; left so, every demonstration would stop 4.5 cm short, 0.5 cm inside the 5 cm success radius."""
    w = sim.World(task, variation=sim.Variation(markers=markers))
    try:
        for s in range(3):
            w.seed(s)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(150):
                    w.step(w.expert_action())
            assert np.linalg.norm(w.hand() - w.env._target_pos) < 0.015, (s, w.hand(), w.env._target_pos)
    finally:
        w.close()


def test_reach_markers_float_at_one_height():
    """From one camera a floating sphere's height trades off against its distance: one height keeps the goal unique."""
    w = sim.World("reach", variation=sim.Variation(markers=3))
    try:
        heights = set()
        for s in range(5):
            w.seed(s)
            heights |= set(np.round(w.markers[:, 2], 6))
        assert len(heights) == 1, heights
    finally:
        w.close()


def test_novel_goal_colours_name_only_the_goal():
    var = sim.Variation(markers=3, goal_colors=("teal=0,0.5,0.5", "lime=0.6,1,0.2"))
    w = sim.World("reach", variation=var)
    try:
        for s in range(10):
            w.seed(s)
            assert w.marker_words[0] in ("teal", "lime") and not {"teal", "lime"} & set(w.marker_words[1:])
    finally:
        w.close()
    assert var.all_marker_colors()[:2] == ["teal=0,0.5,0.5", "lime=0.6,1,0.2"]


def test_ambiguous_goal_is_a_coin_flip_between_two_alike_markers():
    w = sim.World("reach", variation=sim.Variation(markers=3, ambiguous=1.0))
    try:
        runs, picks = [], []
        for s in range(40):
            runs.append(run_expert(w, 200 + s))
            picks.append(w.goal_marker)
            assert w.marker_words[0] == w.marker_words[1] != w.marker_words[2]
        assert 0.3 <= np.mean(picks) <= 0.7, np.mean(picks)
        assert all(ok and nearest in (0, 1) for ok, nearest in runs)  # either goal of the named colour counts
    finally:
        w.close()


def test_between_tells_the_midpoint_of_two_goals_from_either_goal():
    w = sim.World("push", variation=sim.Variation(markers=3, ambiguous=1.0))
    try:
        w.seed(0)
        a, b = w.markers[w.goals()]
        for xyz, between in (((a + b) / 2, True), (a, False), (b, False)):
            w.env._set_obj_xyz(xyz)
            mujoco.mj_forward(w.model, w.data)
            assert np.allclose(w.objects()[0, :2], xyz[:2], atol=1e-3) and w.between() is between
        w.seed(1)
        assert len(w.goals()) == 2  # every layout is ambiguous here
    finally:
        w.close()
    plain = sim.World("push", variation=sim.Variation(markers=3))
    plain.seed(0)
    assert plain.between() is None and plain.goals() == [0]
    plain.close()
