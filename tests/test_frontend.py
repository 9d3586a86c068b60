"""Both frontends (torch.export and ONNX) import every zoo model; TVM builds match torch."""

import numpy as np
import pytest
import torch

from flexiq_tvm import frontend
from flexiq_tvm.zoo import registry

ALL = list(registry.MODELS)


@pytest.fixture(scope="module")
def models():
    return {}


def _model_and_input(name, cache):
    if name not in cache:
        spec = registry.spec(name)
        if spec.dataset == "fmnist":
            from flexiq_tvm.zoo import load_fmnist

            x = load_fmnist("test", limit=4)[0]
        else:
            from flexiq_tvm.zoo import load_natural

            x = load_natural("evaluation", limit=2)[0]
        cache[name] = (registry.get_model(name), x)
    return cache[name]


@pytest.mark.parametrize("via", frontend.VIA)
@pytest.mark.parametrize("name", ALL)
def test_zoo_model_imports_builds_and_matches_torch(name, via, models):
    model, x = _model_and_input(name, models)
    imported = frontend.import_model(model, x, via=via)
    assert imported.source == via
    assert imported.num_inputs == 1 and imported.input_shapes == [x.shape]
    assert len(imported.params) == len(imported.param_names) > 0
    if via == "torch.export":  # ONNX also lifts shape constants into params
        assert len(imported.params) <= len(model.state_dict())
    out = frontend.build_fp32(imported)(x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    assert (out.argmax(1) == ref.argmax(1)).all()


def test_onnx_file_path_and_declared_shapes(tmp_path):
    model = registry.get_model("resnet20_fmnist")
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    path = tmp_path / "r20.onnx"
    frontend.export_onnx(model, x, path)
    imported = frontend.import_model(path)  # shape declared in the graph
    assert imported.source == "onnx" and imported.input_shapes == [(3, 1, 28, 28)]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(frontend.build_fp32(imported)(x), ref, atol=1e-4, rtol=0)


def test_onnx_dynamic_batch_needs_a_shape(tmp_path):
    import onnx

    model = registry.get_model("resnet20_fmnist")
    proto = frontend.export_onnx(model, np.zeros((1, 1, 28, 28), np.float32))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(ValueError, match="dynamic shape"):
        frontend.from_onnx(proto)
    with pytest.raises(ValueError, match="not graph inputs"):
        frontend.from_onnx(proto, {"images": (1, 1, 28, 28)})
    imported = frontend.from_onnx(proto, {"input": (2, 1, 28, 28)})
    assert imported.input_shapes == [(2, 1, 28, 28)]
    onnx.checker.check_model(proto)


def test_efficientnet_onnx_graph_needs_constant_folding():
    model = registry.get_model("efficientnet_lite0_imagenet")
    proto = frontend.export_onnx(model, np.zeros((1, 3, 224, 224), np.float32))
    assert frontend._has_runtime_shapes(proto)  # "same" padding computed in the graph
    folded = frontend.fold_onnx_constants(proto)
    assert not frontend._has_runtime_shapes(folded)
    assert sum(n.op_type == "Conv" for n in folded.graph.node) == 49


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        frontend.import_model(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="expected an ONNX path"):
        frontend.import_model(42)
    with pytest.raises(ValueError, match="needs example_input"):
        frontend.import_model(registry.get_model("resnet20_fmnist"))
    with pytest.raises(ValueError, match=r"via='tflite'"):
        frontend.import_model(registry.get_model("resnet20_fmnist"), via="tflite")
    with pytest.raises(TypeError, match=r"torch\.Tensor or numpy"):
        frontend.from_torch(registry.get_model("resnet20_fmnist"), [[1.0]])
