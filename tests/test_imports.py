"""Light imports: the sharding tool's modules (and its worker processes) load neither torch nor
PIL nor webdataset; engines and data sources load only when a run asks for them."""
import subprocess
import sys


def _modules_after(imports: str) -> set:
    code = f"import sys; {imports}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_shard_modules_need_neither_torch_nor_pil():
    loaded = _modules_after("import massl.data.shards, massl.data.epoch_plan, massl.tools.shard")
    assert not {"torch", "PIL", "webdataset"} & loaded


def test_engines_and_sources_load_on_demand():
    loaded = _modules_after("import massl.train")
    assert not {"massl.engines.fsdp", "massl.engines.ddp", "massl.data.webdataset", "webdataset"} & loaded


def test_augment_layers_import_only_below_themselves():
    """augment/draw.py is the bottom layer (the parameter rows); the CPU and device ops sit on it
    and never on each other or on multicrop.py, which uses them all."""
    loaded = _modules_after("import massl.data.augment.draw")
    assert not {"massl.data.augment.cpu", "massl.data.augment.device", "massl.data.multicrop", "cv2"} & loaded
    for layer, other in (("cpu", "device"), ("device", "cpu")):
        loaded = _modules_after(f"import massl.data.augment.{layer}")
        assert not {f"massl.data.augment.{other}", "massl.data.multicrop"} & loaded, layer
