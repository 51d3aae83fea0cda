"""Config loading: defaults, YAML round trip, and a clear error naming the field for every bad case."""
import dataclasses
import os
import re

import pytest

from dml_core.config import Config, ConfigError, _deep_merge, config_from_dict, load_config, parse_overrides


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = config_from_dict({})
    assert cfg.run.root == os.path.abspath(Config().run.root)  # the default root, made absolute
    assert dataclasses.replace(cfg, run=Config().run) == Config()
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_yaml_sections_and_nested_losses(tmp_path):
    cfg = load_config(write(tmp_path, """
run: {name: demo, root: /tmp/x}
data: {batch_size: 32, p: 8, k: 4}
model: {backbone: resnet18, embedding_dim: 64, backbone_options: {norm: group}}
loss:
  base: decomposable
  tau: 0.2
  tcm: {m_pos: 0.8}
  bct: {old_checkpoint: /tmp/old, lambda_bct: 0.5}
train: {steps: 10, lr: 1, grad_cache_chunk: 16}
ray: {num_workers: 3, resources_per_worker: {CPU: 2}}
"""))
    assert cfg.loss.base == "decomposable" and cfg.loss.tau == 0.2
    assert cfg.loss.tcm.m_pos == 0.8 and cfg.loss.tcm.m_neg == 0.5  # default fills the rest
    assert cfg.loss.bct.lambda_bct == 0.5 and cfg.loss.bct.tau_bct == 0.05
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0  # int accepted for a float
    assert cfg.ray.resources_per_worker == {"CPU": 2.0}
    assert cfg.data_root == "/tmp/x"


@pytest.mark.parametrize("raw, field", [
    ({"trian": {}}, "trian"),
    ({"train": {"stepz": 3}}, "train.stepz"),
    ({"loss": {"tcm": {"m_poz": 1}}}, "loss.tcm.m_poz"),
    ({"loss": {"base": "triplet"}}, "loss.base"),
    ({"loss": {"objective": "weakly"}}, "loss.objective"),
    ({"model": {"backbone": "resnet7"}}, "model.backbone"),
    ({"data": {"batch_size": "64"}}, "data.batch_size"),
    ({"train": {"steps": 2.5}}, "train.steps"),
    ({"ray": {"use_gpu": "yes"}}, "ray.use_gpu"),
    ({"ray": {"num_workers": True}}, "ray.num_workers"),
    ({"train": {"schedule": "linear"}}, "train.schedule"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"loss": {"tau": 0}}, "loss.tau"),
    ({"loss": {"gamma": 1.5}}, "loss.gamma"),
    ({"data": {"batch_size": 30}}, "data.batch_size"),  # != p * k = 64
    ({"data": {"p": 32, "k": 1, "batch_size": 32}}, "data.k"),
    ({"loss": {"tcm": {"m_pos": 2}}}, "loss.tcm"),
    ({"loss": {"bct": {}}}, "loss.bct.old_checkpoint"),
    ({"loss": {"bct": {"old_checkpoint": "x", "tau_bct": 0}}}, "loss.bct is invalid: tau_bct must be > 0"),
    ({"loss": {"bct": {"old_checkpoint": "x"}, "objective": "self_supervised"}}, "loss.bct"),
    ({"ray": {"resources_per_worker": {"CPU": -1}}}, "ray.resources_per_worker.CPU"),
    ({"run": {"name": "a/b"}}, "run.name"),
    ({"storage": {"retry_seconds": -1}}, "storage.retry_seconds"),
    ({"ray": {"temp_dir": "relative/ray"}}, "ray.temp_dir"),
    ({"ray": {"temp_dir": "/tmp/" + "x" * 40}}, "ray.temp_dir"),  # too long for Ray's socket paths
    ({"data": []}, "data"),
    ({"data": {"train_classes": 1}}, "data.train_classes"),
    ({"data": {"train_classes": 0}}, "data.train_classes"),
])
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, source="my.yaml")
    assert field in str(e.value) and "my.yaml" in str(e.value)


@pytest.mark.parametrize("loss, message", [
    ({"base": "arc_face"}, "loss.base is unknown: 'arc_face'; known: info_nce, decomposable, arcface, cosface, "
                           "proxy_anchor"),
    ({"base": "arcface", "objective": "self_supervised"}, "loss.base arcface needs loss.objective: supervised"),
    ({"base": "arcface", "m": 3.5}, "loss.m is invalid: ArcFace: m is an angle in radians and must be < pi"),
    ({"base": "cosface", "m": -0.1}, "loss.m is invalid: CosFace: m must be >= 0"),
    ({"base": "cosface", "s": 0}, "loss.s is invalid: CosFace: s must be > 0"),
    ({"base": "proxy_anchor", "alpha": -1}, "loss.alpha is invalid: ProxyAnchor: alpha must be > 0"),
    ({"base": "proxy_anchor", "delta": -0.5}, "loss.delta is invalid: ProxyAnchor: delta must be >= 0"),
    ({"base": "proxy_anchor", "proxy_lr_mult": -1}, "loss.proxy_lr_mult must be >= 0"),
])
def test_bad_proxy_losses_name_the_field(loss, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"loss": loss}, source="my.yaml")


def test_proxy_losses_defaults_follow_methods():
    lc = config_from_dict({"loss": {"base": "proxy_anchor"}}).loss
    assert (lc.s, lc.m, lc.alpha, lc.delta, lc.proxy_lr_mult) == (64.0, None, 32.0, 0.1, 100.0)
    for base in ("arcface", "cosface"):  # m: null is each loss's own default; 4 is a fine CosFace margin
        assert config_from_dict({"loss": {"base": base, "m": 0.2 if base == "arcface" else 4}}).loss.base == base


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "run: [unclosed"))


def test_external_backbones_pass_validation():
    assert config_from_dict({"model": {"backbone": "timm:resnet18"}}).model.backbone == "timm:resnet18"


def test_demo_config_loads():
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "fashion_mnist.yaml")
    cfg = load_config(path)
    assert cfg.data.dataset == "fashion_mnist" and cfg.ray.address is None


# ---------------------------------------------- normalisation and gradient caching (METHODS 1.4) -----

@pytest.mark.parametrize("model", [
    {},  # small_cnn, BatchNorm by default
    {"backbone_options": {"norm": "batch"}},
    {"backbone": "resnet18"},
    {"backbone": "resnet50", "backbone_options": {"norm": "batch"}},
])
def test_grad_cache_with_train_mode_batch_norm_is_refused(model):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": model, "train": {"grad_cache_chunk": 16}}, source="my.yaml")
    message = str(e.value)
    assert message.startswith("my.yaml: train.grad_cache_chunk with model.backbone_options.norm=batch")
    assert "differ from the full batch" in message
    assert "set model.backbone_options.norm to group or frozen_batch, or drop train.grad_cache_chunk" in message


@pytest.mark.parametrize("model", [
    {"backbone_options": {"norm": "group"}},
    {"backbone_options": {"norm": "frozen_batch", "widths": [8, 16]}},
    {"backbone_options": {"norm": "none"}},
    {"backbone": "resnet18", "backbone_options": {"norm": "frozen_batch"}},
    {"backbone": "vit_tiny"},  # LayerNorm: per-sample
    {"backbone": "timm:resnet18"},  # external: checked when GradCache runs
])
def test_grad_cache_with_per_sample_normalisation_is_accepted(model):
    cfg = config_from_dict({"model": model, "train": {"grad_cache_chunk": 16}})
    assert cfg.train.grad_cache_chunk == 16 and cfg.model.backbone_options == model.get("backbone_options", {})


def test_batch_norm_without_grad_cache_stays_the_default():
    cfg = config_from_dict({})
    assert cfg.model.backbone_options == {} and cfg.train.grad_cache_chunk is None
    explicit = config_from_dict({"model": {"backbone_options": {"norm": "batch"}}})
    assert explicit.model.backbone_options["norm"] == "batch"


@pytest.mark.parametrize("model, match", [
    ({"backbone_options": {"norm": "layer"}}, "model.backbone_options.norm must be one of"),
    ({"backbone": "resnet18", "backbone_options": {"norm": "none"}}, "model.backbone_options.norm must be one of"),
    ({"backbone": "vit_tiny", "backbone_options": {"norm": "group"}},
     "model.backbone_options.norm is not an option of vit_tiny"),
])
def test_bad_norm_is_named(model, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": model}, source="my.yaml")


def test_relative_local_roots_become_absolute_at_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"run": {"root": "./store"}, "data": {"root": "data"},
                            "loss": {"bct": {"old_checkpoint": "runs/old/checkpoints/checkpoint_00000010"}}})
    assert cfg.run.root == str(tmp_path / "store") and cfg.data.root == str(tmp_path / "data")
    assert cfg.loss.bct.old_checkpoint == str(tmp_path / "runs/old/checkpoints/checkpoint_00000010")
    s3 = config_from_dict({"run": {"root": "s3://bucket/prefix"}})
    assert s3.run.root == "s3://bucket/prefix" and s3.data_root == "s3://bucket/prefix"


# ---------------------------------------------- numbers, non-finite values, empty files ------------

def test_yaml_12_numbers_load_as_numbers(tmp_path):
    cfg = load_config(write(tmp_path, "train: {lr: 1e-3, weight_decay: .5e-4, steps: 1_000}\nloss: {tau: +5E-2}\n"))
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.steps, cfg.loss.tau) == (1e-3, 0.5e-4, 1000, 0.05)


@pytest.mark.parametrize("text, field", [
    ("train: {lr: .nan}", "train.lr"),
    ("train: {lr: .inf}", "train.lr"),
    ("loss: {tau: .nan}", "loss.tau"),
    ("loss: {tau: 1e400}", "loss.tau"),  # overflows to inf
    ("train: {weight_decay: -.inf}", "train.weight_decay"),
    ("loss: {base: decomposable, gamma_shape: .inf}", "loss.gamma_shape"),
    ("loss: {tcm: {m_neg: -.inf}}", "loss.tcm.m_neg"),
    ("loss: {bct: {old_checkpoint: x, tau_bct: .nan}}", "loss.bct.tau_bct"),
    ("ray: {resources_per_worker: {CPU: .inf}}", "ray.resources_per_worker.CPU"),
])
def test_non_finite_floats_are_refused_naming_the_field(tmp_path, text, field):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {field} must be a finite number, got ")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "null\n", "~\n", "---\n"])
def test_an_empty_config_file_is_refused_naming_the_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: the config file is empty; give at least run.name and run.root"


def test_parse_overrides_nests_and_reads_yaml_values():
    got = parse_overrides(["train.steps=50", "loss.tcm={m_pos: 0.8}", "ray.address=null", "train.lr=1e-3",
                           "run.name=v2", "train.seed=017"])
    assert got == {"train": {"steps": 50, "lr": 1e-3, "seed": 17}, "loss": {"tcm": {"m_pos": 0.8}},
                   "ray": {"address": None}, "run": {"name": "v2"}}
    cfg = config_from_dict(_deep_merge({"run": {"name": "a", "root": "/tmp/r"}}, got))
    assert cfg.train.steps == 50 and cfg.loss.tcm.m_pos == 0.8 and cfg.run.name == "v2"


@pytest.mark.parametrize("bad", ["train.steps", "=5", "train..steps=5", "train.steps=[1,"])
def test_parse_overrides_rejects_malformed(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_overrides([bad])


def test_an_override_of_an_unknown_field_is_named():
    with pytest.raises(ConfigError, match="train.stepz"):
        config_from_dict(_deep_merge({"run": {"name": "a", "root": "/tmp/r"}}, parse_overrides(["train.stepz=5"])))


@pytest.mark.parametrize("data,field", [
    ({"source": {"kind": "tfrecords"}}, "data.source.kind"),
    ({"source": {"kind": "fashion_mnist", "max_per_clas": 3}}, "data.source.max_per_clas"),
    ({"source": {"kind": "image_folder"}}, "data.source.root"),
    ({"source": {"max_per_class": 3}}, "data.source.kind"),
    ({"sharding": {"gallery_fraction": 1.0}}, "data.sharding.gallery_fraction"),
    ({"sharding": {"eval_class_fraction": -0.1}}, "data.sharding.eval_class_fraction"),
    ({"sharding": {"max_shard_samples": 0}}, "data.sharding.max_shard_samples"),
    ({"sharding": {"seeds": 1}}, "data.sharding.seeds"),
])
def test_bad_data_source_and_sharding_name_the_field(data, field):
    with pytest.raises(ConfigError, match=rf"config: (unknown key\(s\) )?{field}\b"):
        config_from_dict({"data": data})


def test_data_source_builds_the_named_source_with_its_options():
    from dml_core.data.sources.from_config import build_source

    cfg = config_from_dict({"data": {"source": {"kind": "synthetic", "data": "images", "num_classes": 3,
                                                "per_class": 2, "image_size": [8, 8]},
                                     "sharding": {"seed": 4, "max_shard_samples": 7}}})
    source = build_source(cfg.data.source)
    assert source.describe()["data"] == "images" and len(source.list_items()) == 6
    assert cfg.data.sharding.seed == 4 and cfg.data.sharding.gallery_fraction == 0.5
    assert config_from_dict({}).data.source == {"kind": "fashion_mnist"}


def test_bct_from_the_gallery_is_kept_as_a_word_not_made_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"loss": {"bct": {"old_checkpoint": "gallery"}}})
    assert cfg.loss.bct.old_checkpoint == "gallery"
    cfg = config_from_dict({"loss": {"bct": {"old_checkpoint": "old/ckpt"}}})
    assert cfg.loss.bct.old_checkpoint == str(tmp_path / "old" / "ckpt")
