"""Config validation: every mistake fails before compute, naming the file, the field and what is expected."""
from pathlib import Path

import pytest
import yaml

from style_factory.config import ConfigError, RunConfig, TrainConfig, load_run_config, load_style, load_styles
from style_factory.run import REGISTRY
from tests.helpers import REPO, make_style


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_example_styles_and_configs_are_valid():
    run = RunConfig()
    styles = load_styles(run.model_copy(update={"styles_dir": str(REPO / "styles")}), REGISTRY)
    assert {s.name for s in styles} == {"realism", "anime", "romanticism", "cubism", "pixel-art", "watercolor"}
    assert any(len(s.config.concepts) > 1 for s in styles)  # a Multi-StyleBoost example
    assert load_run_config(REPO / "configs" / "tiny-demo.yaml", REGISTRY) == RunConfig()
    assert load_run_config(REPO / "configs" / "sd15-gpu.yaml", REGISTRY).model.base == "runwayml/stable-diffusion-v1-5"


@pytest.mark.parametrize("text, expected", [
    ("train: {max_steps: [1, 2", "malformed YAML"),
    ("train: {max_stpes: 10}", "train.max_stpes: unknown field (misspelled?)"),
    ("train: {max_steps: ten}", "train.max_steps"),
    ("train: {learning_rate: -1}", "train.learning_rate: Input should be greater than 0"),
    ("model: {resolution: 100}", "model.resolution: Input should be a multiple of 8"),
    ("local_cpus: 0", "local_cpus: Input should be greater than or equal to 1"),
    ("name: '../escape'", "name: Value error, must be a safe directory name"),
    ("methods: [dreambooth2]", "methods: Value error, unknown method 'dreambooth2'"),
    ("methods: [styleboost, content]", "methods: Value error, 'content' trains a subject's content adapter"),
    ("baselines: [styleboost]", "baselines: Value error, 'styleboost' trains; baselines are zero-shot methods"),
    ("train: {method_options: {styleboost: {rank: 4}}}", "rank"),
    ("train: {per_method: {dreambooth: {learning_rate: -1}}}", "learning_rate"),
    ("train: {per_method: {dreambooth: {max_stpes: 10}}}", "max_stpes"),
    ("train: {per_method: {dreambooth2: {max_steps: 10}}}", "unknown method 'dreambooth2'"),
    ("train: {per_method: {textboost: {per_method: {}}}}", "textboost: per_method cannot be set per method"),
    ("- just\n- a list", "expected a mapping"),
    ("model: {base: /does/not/exist}", "model.base: local diffusers folder /does/not/exist does not exist"),
])
def test_run_config_errors_name_file_and_field(tmp_path, text, expected):
    path = write(tmp_path / "run.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_run_config(path, REGISTRY)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_missing_run_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match="run config not found"):
        load_run_config(tmp_path / "nope.yaml", REGISTRY)


@pytest.mark.parametrize("change, expected", [
    ({"concepts": []}, "concepts: List should have at least 1 item"),
    ({"concepts": [{"token": "two words", "class_word": "style"}]}, "concepts.0.token"),
    ({"concepts": [{"token": "zwx", "class_word": "style", "ref": "../../etc"}]}, "leaves the style folder"),
    ({"concepts": [{"token": "zwx", "class_word": "style", "ref": "missing"}]}, "concepts.0.ref: folder"),
    ({"concepts": [{"token": "zwx", "class_word": "style", "heldout": "missing"}]}, "concepts.0.heldout: folder"),
    ({"train": {"batch_size": 0}}, "train.batch_size: Input should be greater than or equal to 1"),
    ({"train": {"max_stpes": 3}}, "max_stpes"),
    ({"colour": "red"}, "colour: unknown field"),
    ({"method": "textinversion"}, "method: Value error, unknown method 'textinversion'"),
    ({"method": "content"}, "method: Value error, 'content' trains a subject's content adapter, not a style"),
])
def test_style_config_errors(tmp_path, change, expected):
    style = make_style(tmp_path, "mystyle", "zwx")
    config = yaml.safe_load((style / "style.yaml").read_text())
    config.update(change)
    (style / "style.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as err:
        load_style(style, REGISTRY)
    assert str(style / "style.yaml") in str(err.value) and expected in str(err.value)


def test_unsafe_style_folder_name_and_token_collisions(tmp_path):
    make_style(tmp_path, "Bad Name", "abc")
    with pytest.raises(ConfigError, match="not a safe name"):
        load_style(tmp_path / "Bad Name", REGISTRY)
    root = tmp_path / "styles"
    make_style(root, "one", "zwx")
    make_style(root, "two", "zwx")
    with pytest.raises(ConfigError, match="token 'zwx' is also used by style 'one'"):
        load_styles(RunConfig(styles_dir=str(root)), REGISTRY)
    with pytest.raises(ConfigError, match=r"no style folder with a style.yaml for \['three'\]"):
        load_styles(RunConfig(styles_dir=str(root)), REGISTRY, ["three"])


def test_style_train_overrides_merge_over_the_run(tmp_path):
    style = load_style(make_style(tmp_path, "s", "zwx", train={"max_steps": 7}), REGISTRY)
    merged = style.train_config(RunConfig(train=TrainConfig(batch_size=3)), "styleboost")
    assert (merged.max_steps, merged.batch_size) == (7, 3)


def test_per_method_overrides_apply_last_and_only_to_their_method(tmp_path):
    style = load_style(make_style(tmp_path, "s", "zwx", train={"max_steps": 7, "learning_rate": 2e-4}), REGISTRY)
    run = RunConfig(train=TrainConfig(
        batch_size=3, per_method={"dreambooth": {"learning_rate": 5e-5, "batch_size": 1}},
        method_options={"dreambooth": {"num_class_images": 4}, "styledrop": {"rank": 2}}))
    dreambooth, styleboost = style.train_config(run, "dreambooth"), style.train_config(run, "styleboost")
    assert (dreambooth.learning_rate, dreambooth.batch_size, dreambooth.max_steps) == (5e-5, 1, 7)
    assert (styleboost.learning_rate, styleboost.batch_size, styleboost.max_steps) == (2e-4, 3, 7)
    assert dreambooth.method_options == {"dreambooth": {"num_class_images": 4}} and styleboost.method_options == {}
    assert dreambooth.per_method == {} == styleboost.per_method
    # another method's settings leave a job's settings, and so its key, as they were
    other = RunConfig(train=TrainConfig(batch_size=3, per_method={"dreambooth": {"learning_rate": 1e-6}}))
    assert style.train_config(other, "styleboost") == styleboost


def test_relative_paths_in_a_config_file_resolve_against_its_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    make_style(project / "styles", "mystyle", "zwx")
    (project / "models" / "sd").mkdir(parents=True)
    write(project / "run.yaml", "styles_dir: styles\nresults_dir: ../out\n"
          "model: {base: ./models/sd, models_dir: weights}\ncurate: {captioner: ./models/blip}\n"
          "evaluate: {inception: w/inception-2015-12-05.pt, clip: 'ViT-B-32:w/clip.safetensors', dino: ~/dino.st}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    run = load_run_config("../project/run.yaml", REGISTRY)
    assert (run.styles_dir, run.results_dir) == (str(project / "styles"), str(tmp_path / "out"))
    assert (run.model.base, run.model.models_dir) == (str(project / "models" / "sd"), str(project / "weights"))
    assert run.curate.captioner == str(project / "models" / "blip")
    assert run.evaluate.inception == str(project / "w" / "inception-2015-12-05.pt")
    assert run.evaluate.clip == f"ViT-B-32:{project / 'w' / 'clip.safetensors'}"
    assert run.evaluate.dino == str(Path("~/dino.st").expanduser())
    assert [style.name for style in load_styles(run, REGISTRY)] == ["mystyle"]


def test_fields_a_config_file_leaves_out_stay_relative_to_the_current_directory(tmp_path, monkeypatch):
    run = load_run_config(write(tmp_path / "run.yaml", "name: x\nmodel: {base: runwayml/stable-diffusion-v1-5}\n"),
                          REGISTRY)
    assert (run.styles_dir, run.results_dir, run.model.base) == ("styles", "results", "runwayml/stable-diffusion-v1-5")
    monkeypatch.chdir(REPO)  # as under make: configs/all-methods.yaml sets no styles_dir, so ./styles serves
    run = load_run_config("configs/all-methods.yaml", REGISTRY)
    assert run.styles_dir == "styles" and len(load_styles(run, REGISTRY)) == 6


@pytest.mark.parametrize("text, field, problem", [
    ("styles_dir: nope", "styles_dir", "folder {} does not exist"),
    ("model: {base: ./nope}", "model.base", "local diffusers folder {} does not exist"),
])
def test_missing_folders_are_named_with_the_file_and_the_field(tmp_path, monkeypatch, text, field, problem):
    config = write(tmp_path / "run.yaml", text)
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as err:
        load_run_config(config, REGISTRY)
    assert str(err.value) == f"{config}: {field}: " + problem.format(tmp_path / "nope")
