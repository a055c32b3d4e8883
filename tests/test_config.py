"""Config layers: defaults, YAML, dotted overrides; unknown keys and wrong types name the key."""

import dataclasses

import pytest
import yaml

from moe_gato.config import apply_overrides, from_dict, load_config, save_config, to_dict


@dataclasses.dataclass(kw_only=True)
class Inner:
    num_experts: int = 4
    kinds: list[str] = dataclasses.field(default_factory=lambda: ["text"])

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")


@dataclasses.dataclass(kw_only=True)
class Outer:
    width: int = 8
    lr: float = 1e-3
    name: str = "tiny"
    moe: Inner = dataclasses.field(default_factory=Inner)
    resume: bool = False


def test_layers_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"width": 16, "moe": {"num_experts": 8}}))
    cfg = load_config(Outer, path, ["moe.num_experts=2", "lr=3e-4", "name=big"])
    assert (cfg.width, cfg.moe.num_experts, cfg.lr, cfg.name) == (16, 2, 3e-4, "big")
    assert cfg.moe.kinds == ["text"]
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("data, match", [
    ({"widht": 3}, "unknown config key widht"),
    ({"moe": {"num_expert": 3}}, "unknown config key moe.num_expert"),
    ({"width": "wide"}, "width: expected an integer"),
    ({"width": 2.5}, "width: expected an integer"),
    ({"resume": "yes"}, "resume: expected true or false"),
    ({"moe": {"kinds": "text"}}, "moe.kinds: expected a list"),
    ({"moe": {"num_experts": 0}}, "moe.num_experts must be >= 1"),
])
def test_bad_configs_name_the_key(data, match):
    with pytest.raises(ValueError, match=match):
        from_dict(Outer, data)


def test_bad_overrides_and_files(tmp_path):
    with pytest.raises(ValueError, match="dotted.key=value"):
        apply_overrides({}, ["width"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(Outer, tmp_path / "list.yaml")
    assert to_dict(Outer())["moe"] == {"num_experts": 4, "kinds": ["text"]}
