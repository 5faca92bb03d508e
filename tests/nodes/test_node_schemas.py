"""Every PatchLab node's schema: ids, categories, descriptions, tooltips, types."""

import json
import re
import sys
from pathlib import Path

import pytest

from devtools import workflows

pack = sys.modules["patchlab"]
NODES = pack.NODE_CLASS_MAPPINGS
COMFY_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "SIGMAS", "NOISE", "SAMPLER",
               "GUIDER", "CONTROL_NET", "CLIP_VISION", "CLIP_VISION_OUTPUT", "INT", "FLOAT", "STRING", "BOOLEAN",
               "COMBO"}


def all_inputs(node):
    """The inputs the editor shows (hidden inputs such as UNIQUE_ID have no widget and no tooltip)."""
    for group, inputs in node.INPUT_TYPES().items():
        if group != "hidden":
            yield from inputs.items()


def test_the_pack_registers_nodes():
    assert len(NODES) >= 8
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_ids_and_categories_carry_the_pack_prefix(node_id):
    node = NODES[node_id]
    assert re.fullmatch(r"PatchLab_[A-Za-z0-9_]+", node_id)
    assert node.NODE_ID == node_id
    assert node.CATEGORY.startswith("PatchLab/")
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].endswith("(PatchLab)")


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_description_is_one_paragraph(node_id):
    description = NODES[node_id].DESCRIPTION
    assert 80 < len(description) < 1200 and "\n" not in description


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_every_input_and_output_has_a_tooltip(node_id):
    node = NODES[node_id]
    for name, spec in all_inputs(node):
        assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES)
    assert all(node.OUTPUT_TOOLTIPS)


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_custom_types_carry_the_pack_prefix(node_id):
    node = NODES[node_id]
    kinds = [spec[0] for _, spec in all_inputs(node) if isinstance(spec[0], str)] + list(node.RETURN_TYPES)
    for kind in kinds:
        assert kind in COMFY_TYPES or kind.startswith("PATCHLAB_"), kind


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_numeric_defaults_lie_within_their_range(node_id):
    for name, (kind, options) in all_inputs(NODES[node_id]):
        if kind in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"], name
        if isinstance(kind, list) and "default" in options:
            assert options["default"] in kind, name


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_node_info_is_json_as_the_server_sends_it(node_id):
    info = workflows.node_info(NODES[node_id])
    assert json.loads(json.dumps(info))["output"] == list(NODES[node_id].RETURN_TYPES)
    assert callable(getattr(NODES[node_id](), NODES[node_id].FUNCTION))


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_every_node_has_a_help_page(node_id):
    page = Path(pack.__file__).parent / pack.WEB_DIRECTORY / "docs" / f"{node_id}.md"
    assert page.is_file(), f"write {page}"
    assert page.read_text().startswith("# ")


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_every_help_page_opens_with_quick_use(node_id):
    page = Path(pack.__file__).parent / pack.WEB_DIRECTORY / "docs" / f"{node_id}.md"
    sections = [line for line in page.read_text().splitlines() if line.startswith("## ")]
    assert sections[0] == "## Quick use"


def test_no_id_shadows_a_core_node(core_nodes):
    assert not set(NODES) & {k for k in core_nodes if not k.startswith("PatchLab_")}


def test_package_version_matches_pyproject():
    pyproject = (Path(pack.__file__).parent / "pyproject.toml").read_text()
    assert f'version = "{pack.__version__}"' in pyproject


def test_registry_fields_name_a_publisher_a_display_name_and_an_icon_in_the_repository():
    tomllib = pytest.importorskip("tomllib")
    root = Path(pack.__file__).parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and project["project"]["urls"]["Repository"]
    assert "comfyui" not in project["project"]["name"].lower()  # the Registry's naming rule
    icon_path = comfy["Icon"].split("/main/", 1)[1]
    from PIL import Image

    with Image.open(root / icon_path) as icon:
        assert icon.width == icon.height <= 400
