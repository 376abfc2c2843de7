import pytest
import torch

from securemark.modelio import ModelFileError, load_state_dict, save_state_dict, state_digest


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_keeps_the_digest(tmp_path, suffix):
    sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3), "steps": torch.tensor(7)}
    save_state_dict(sd, tmp_path / f"m{suffix}")
    back = load_state_dict(tmp_path / f"m{suffix}")
    assert state_digest(back) == state_digest(sd)
    sd["a.bias"] = sd["a.bias"] + 1
    assert state_digest(back) != state_digest(sd)


def test_untrusted_files_are_refused_with_a_message(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ModelFileError, match="could not be read"):
        load_state_dict(tmp_path / "junk.safetensors")

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match="pickled objects beyond tensors; refused") as info:
        load_state_dict(tmp_path / "evil.pt")  # weights_only refuses to unpickle arbitrary objects
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)  # no advice to run it
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match="not a flat mapping"):
        load_state_dict(tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match="does not exist"):
        load_state_dict(tmp_path / "none.pt")
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(ModelFileError, match="unknown model format"):
        load_state_dict(tmp_path / "m.onnx")
