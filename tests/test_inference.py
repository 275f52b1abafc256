"""inference_ldm.py and src/pipeline.py on small stage-2 model files built here (random weights)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference_ldm
from src.config import Stage2TrainConfig, to_dict
from src.pipeline import PipelineError, load_pipeline
from tests.stage2_helpers import make_conditioning_models, make_stage2_file, tiny_unet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_conditioning_models(tmp_path_factory.mktemp("inference_models"))


def _pixels(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{i:03d}.png")) for i in range(n)])


def test_same_seed_gives_the_same_images_and_another_seed_does_not(models, tmp_path):
    def run(seed, out):
        inference_ldm.main(["--path_to_weights", str(models["text"]), "--text_conditional", "--training_dataset",
                            "shapes", "--prompt", "a red circle on a blue background", "--num_images", "2",
                            "--num_steps", "4", "--seed", str(seed), "--output", str(tmp_path / out)])
        return _pixels(tmp_path / out, 2)

    a, b, c = run(3, "a"), run(3, "b"), run(4, "c")
    assert a.shape == (2, 16, 16, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 + 2 * 18, 2 + 18)


def test_prompts_negative_prompt_guidance_and_ddpm_change_the_images(models):
    pipe = load_pipeline(models["text"])
    kw = dict(prompts=["a red circle on a blue background", "a white square"], num_per_condition=1, num_steps=4, seed=1)
    base = pipe.generate(guidance_scale=3.0, **kw)
    assert base.shape == (2, 3, 16, 16) and base.min() >= -1 and base.max() <= 1
    assert not torch.equal(base[0], base[1])  # different prompts, same noise: different images
    assert not torch.equal(base, pipe.generate(guidance_scale=3.0, negative_prompt="a black background", **kw))
    assert not torch.equal(base, pipe.generate(guidance_scale=1.0, **kw))
    ddpm = pipe.generate(prompts=kw["prompts"], sampler="ddpm", guidance_scale=3.0, seed=1)
    assert ddpm.shape == base.shape and not torch.equal(ddpm, base)


@pytest.mark.usefixtures("one_thread")
def test_image_j_of_a_prompt_keeps_its_noise_whatever_the_other_images_prompts_and_batches(models):
    """Each image's noise is seeded by (seed, j): DDPM (noise at every step) gives prompt B's image j the same pixels
    alone, after prompt A, and with more images; evaluate_shapes.py's --batch_size does not change its images."""
    pipe = load_pipeline(models["text"])
    kw = dict(sampler="ddpm", seed=3)
    alone = pipe.generate(prompts=["a white square"], num_per_condition=2, **kw)  # (2, 3, 16, 16)
    after_a = pipe.generate(prompts=["a red circle", "a white square"], num_per_condition=3, **kw)  # (6, 3, 16, 16)
    torch.testing.assert_close(after_a[3:5], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(after_a[3], after_a[4], atol=0.1)  # images of one prompt still differ
    import evaluate_shapes

    prompts = ["a red circle on a blue background", "a white square on a black background", "a green triangle"]
    flags = ["--path_to_weights", "x", "--sampler", "ddim", "--num_steps", "2", "--exclude_prompts", __file__]
    whole, split = (evaluate_shapes.generate(pipe, prompts, evaluate_shapes.parse_args(flags + ["--batch_size", b]))
                    for b in ("3", "1"))
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)
    assert not torch.allclose(whole[0], whole[1], atol=0.1)


def test_a_float16_overflow_is_an_error_not_black_images(models):
    """A UNet whose activations pass float16's 65504 (here: its first convolution scaled up) samples NaN, which the
    PNG conversion wrote as black pixels; generate now stops and names the dtype to use."""
    pipe = load_pipeline(models["none"], dtype=torch.float16)
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(3e4)
    with pytest.raises(PipelineError, match="inf / NaN in 2 of 2 images: the UNet overflowed float16's range"):
        pipe.generate(num_per_condition=2, num_steps=2, seed=0)


def test_under_float16_the_text_encoder_runs_in_float32_as_in_training(models):
    """Training keeps the frozen encoders in fp32 under fp16 (T5's feed-forward overflows fp16); sampling does too,
    and hands the UNet its condition in fp16. bfloat16 runs the encoder in bfloat16."""
    for dtype, encoder_dtype in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        pipe = load_pipeline(models["text"], dtype=dtype)
        assert {p.dtype for p in pipe.text_encoder.parameters()} == {encoder_dtype}
        assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32 if dtype == torch.float16 else dtype}
        assert pipe.encode_prompts(["a red circle"]).text.dtype == dtype


def test_guidance_against_a_null_condition_that_never_trained_warns_once(tmp_path, caplog):
    """cfg_dropout_prob 0 never trains the null condition that guidance steers away from."""
    train = to_dict(Stage2TrainConfig(num_diffusion_timesteps=20, cfg_dropout_prob=0.0))
    path = make_stage2_file(tmp_path / "m.safetensors", "class", tiny_unet(class_conditioning=True), "imagenet",
                            extra={"training_config": train})
    pipe = load_pipeline(path)
    with caplog.at_level("WARNING", logger="src.pipeline"):
        pipe.generate(labels=[0], num_steps=2, guidance_scale=1.0)
        assert not caplog.records
        for _ in range(2):
            pipe.generate(labels=[0], num_steps=2, guidance_scale=3.0)
    assert [r.getMessage()[:62] for r in caplog.records] == [
        "this model was trained with cfg_dropout_prob 0, so its null co"]


def test_guidance_scale_one_equals_the_conditional_prediction(models):
    """With s = 1 the null condition plays no part: sampling with any negative prompt gives the same images."""
    pipe = load_pipeline(models["text"])
    kw = dict(prompts=["a red circle"], num_per_condition=2, num_steps=3, seed=5, guidance_scale=1.0)
    assert torch.allclose(pipe.generate(**kw), pipe.generate(negative_prompt="green", **kw))


def test_the_default_step_count_fits_a_model_with_fewer_timesteps(models):
    """These models have T = 20 timesteps: DDIM's default of 50 becomes 20, the same as asking for 20."""
    pipe = load_pipeline(models["none"])
    assert pipe.process.num_timesteps == 20
    torch.testing.assert_close(pipe.generate(num_per_condition=1, seed=2), pipe.generate(num_per_condition=1, seed=2,
                                                                                        num_steps=20))
    with pytest.raises(PipelineError, match="--num_steps 50: this model has 20 training timesteps"):
        pipe.generate(num_per_condition=1, num_steps=50)  # an explicit count above T is still refused
    # what evaluate_ldm.py records in results.json: the steps actually run (DDPM: every timestep, not --num_steps)
    assert [pipe.sampler_steps(s) for s in ("ddim", "dpmpp_2m", "ddpm")] == [20, 20, 20]
    assert pipe.sampler_steps("ddim", 7) == 7
    import evaluate_ldm

    with pytest.raises(SystemExit):
        evaluate_ldm.parse_args(["--path_to_weights", "x", "--sampler", "ddpm", "--num_steps", "7"])


def test_a_second_run_into_the_same_folder_leaves_only_its_own_images(models, tmp_path):
    run = lambda n: inference_ldm.main(["--path_to_weights", str(models["none"]), "--num_images", str(n),  # noqa
                                        "--num_steps", "2", "--output", str(tmp_path / "out")])
    run(3)
    run(1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000.png", "grid.png"]
    # past 999 the names have four digits: an earlier run's 1000.png and 1001.png went unnoticed
    inference_ldm.save_images(torch.zeros(1002, 3, 2, 2), tmp_path / "many", nrow=32)
    inference_ldm.save_images(torch.zeros(2, 3, 2, 2), tmp_path / "many", nrow=2)
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["000.png", "001.png", "grid.png"]


def test_an_unwritable_output_folder_fails_before_sampling(tmp_path):
    (tmp_path / "file").write_text("")  # --output under a file: no folder can be made there
    with pytest.raises(ValueError, match="cannot write to the output folder"):  # not the missing model's error
        inference_ldm.main(["--path_to_weights", str(tmp_path / "missing.safetensors"),
                            "--output", str(tmp_path / "file" / "out")])


def test_a_device_this_machine_lacks_is_a_one_line_error_before_loading(models, tmp_path):
    """--device cuda:1 without CUDA (the tests hide the GPUs), mps off a Mac, or a misspelt name: a PipelineError
    naming the flag, not torch's driver traceback from inside load_pipeline."""
    import evaluate_shapes

    assert not torch.cuda.is_available() and not torch.backends.mps.is_available()
    for device, message in (("cuda:1", "no CUDA GPU is available"), ("mps", "MPS .* is not available"),
                            ("gpu0", "not a device name")):
        with pytest.raises(PipelineError, match=f"--device {device}: {message}"):
            inference_ldm.main(["--path_to_weights", str(models["none"]), "--device", device,
                                "--output", str(tmp_path / "out")])
        with pytest.raises(PipelineError, match=f"--device {device}: {message}"):
            evaluate_shapes.main(["--path_to_weights", str(models["text"]), "--device", device,
                                  "--output", str(tmp_path / "out")])
    assert load_pipeline(models["none"], device="cpu").device == torch.device("cpu")


@pytest.mark.usefixtures("one_thread")
def test_a_moved_text_model_folder_names_the_override(models, tmp_path, caplog):
    """The weights store the text model's folder; once it has moved, the error says to pass --text_encoder, which
    then samples as before."""
    import shutil

    moved = shutil.copytree(models["text"].parent / "clip", tmp_path / "clip")  # the tiny CLIP, somewhere else
    model = make_stage2_file(tmp_path / "text.safetensors", "text", tiny_unet(str(tmp_path / "gone")), "shapes",
                             str(tmp_path / "gone"))
    argv = ["--path_to_weights", str(model), "--prompt", "a red circle", "--num_images", "1", "--num_steps", "2",
            "--output", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match=f"text model named in {model}: if it has moved, pass its folder "
                                                "with --text_encoder"):
        inference_ldm.main(argv)
    with caplog.at_level("WARNING", logger="src.pipeline"):
        assert len(inference_ldm.main(argv + ["--text_encoder", str(moved)])) == 2  # grid.png and 000.png
        assert not caplog.records  # the same model, moved
        minilm_width = dataclasses.replace(tiny_unet(str(moved)), text_embed_dim=384)
        other = make_stage2_file(tmp_path / "other.safetensors", "text", minilm_width, "shapes", str(moved))
        load_pipeline(other, text_encoder="all-MiniLM-L6-v2")  # the same width, another model
    assert "--text_encoder all-MiniLM-L6-v2 does not look like" in caplog.records[-1].getMessage()


def test_class_and_unconditional_models(models, tmp_path):
    inference_ldm.main(["--path_to_weights", str(models["class"]), "--training_dataset", "imagenet",
                        "--class_label", "0", "--class_label", "2", "--num_images", "2", "--num_steps", "3",
                        "--output", str(tmp_path / "cls")])
    assert _pixels(tmp_path / "cls", 4).shape == (4, 16, 16, 3)
    pipe = load_pipeline(models["class"])
    with pytest.raises(PipelineError, match="out of range"):
        pipe.generate(labels=[3], num_steps=2)
    with pytest.raises(PipelineError, match="without text conditioning"):
        load_pipeline(models["none"]).generate(prompts=["a face"], num_steps=2)
    inference_ldm.main(["--model_config", "configs/ldm.yaml", "--path_to_weights", str(models["none"]),
                        "--training_dataset", "celebahq", "--num_images", "3", "--num_steps", "2",
                        "--output", str(tmp_path / "unc")])
    assert _pixels(tmp_path / "unc", 3).shape == (3, 16, 16, 3)


def test_class_labels_are_those_of_the_trained_class_folders(tmp_path):
    """A UNet with more class embeddings than the dataset had folders (ldm.yaml's 1000 for a 10-class subset): the
    extra embeddings were never trained, so inference neither picks nor accepts their labels."""
    # num_classes 3; the training folder had two classes
    path = make_stage2_file(tmp_path / "two.safetensors", "class", tiny_unet(class_conditioning=True), "imagenet",
                            extra={"class_names": ["cat", "dog"]})
    pipe = load_pipeline(path)
    assert pipe.unet.num_classes == 3
    picked = {inference_ldm.choose_labels(inference_ldm.parse_args(
        ["--path_to_weights", "x", "--seed", str(seed)]), pipe)[0] for seed in range(30)}
    assert picked == {0, 1}
    with pytest.raises(PipelineError, match=r"trained on classes 0 \.\. 1 \(cat, dog\)"):
        pipe.generate(labels=[2], num_steps=2)
    assert pipe.generate(labels=[1], num_steps=2).shape == (1, 3, 16, 16)
    # --class_label takes a label index or a class folder's name
    def labels(*values):
        return inference_ldm.choose_labels(inference_ldm.parse_args(
            ["--path_to_weights", "x", *[f for v in values for f in ("--class_label", v)]]), pipe)
    assert labels("dog", "0", "cat") == [1, 0, 0]
    with pytest.raises(PipelineError, match=r"--class_label 'fox' is not a class .* \(its classes: cat, dog\)"):
        labels("fox")


def test_empty_prompt_is_a_clear_error(models, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference_ldm.main(["--path_to_weights", str(models["text"]), "--prompt", "  "])
    assert exit_info.value.code == 2
    assert "--prompt is empty" in capsys.readouterr().err
    pipe = load_pipeline(models["text"])
    with pytest.raises(PipelineError, match="prompt 1 is empty"):
        pipe.generate(prompts=[""], num_steps=2)
    with pytest.raises(PipelineError, match="give at least one prompt"):
        pipe.generate(prompts=None, num_steps=2)
    with pytest.raises(PipelineError, match="negative_prompt is empty"):
        pipe.generate(prompts=["a red circle"], negative_prompt=" ", num_steps=2)


def test_wrong_files_and_no_flags_are_clear_errors(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_pipeline(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="a folder: pass the model.safetensors"):
        load_pipeline(tmp_path)  # a checkpoint_N folder, say
    torch.save({"lpips": {}}, tmp_path / "lpips.pt")  # another kind of file: named, not a safetensors traceback
    with pytest.raises(ValueError, match="lpips.pt is not a safetensors file"):
        load_pipeline(tmp_path / "lpips.pt")
    with pytest.raises(PipelineError, match="--class_label needs a class-conditional model"):
        load_pipeline(models["text"]).generate(prompts=["a red circle"], labels=[2], num_steps=2)
    with pytest.raises(PipelineError, match="--text_conditional given"):
        inference_ldm.main(["--path_to_weights", str(models["none"]), "--text_conditional", "--prompt", "a"])
    # the design's first inference command runs `python inference_ldm.py` with no flags: a usage error, no traceback
    done = subprocess.run([sys.executable, "inference_ldm.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "needs at least --path_to_weights" in done.stderr and "Traceback" not in done.stderr


def test_dpm_solver_and_guidance_rescale_through_the_cli(models, tmp_path):
    """--sampler dpmpp_2m (default 20 steps) and --guidance_rescale reach the sampler (its accuracy against
    diffusers and the data distribution: tests/test_recipe_levers.py); a rescale outside [0, 1] is refused."""
    def run(out, *flags):
        inference_ldm.main(["--path_to_weights", str(models["text"]), "--text_conditional", "--prompt",
                            "a red circle on a blue background", "--num_images", "2", "--seed", "7",
                            "--output", str(tmp_path / out), *flags])
        return _pixels(tmp_path / out, 2).astype(np.int64)

    dpm = run("dpm", "--sampler", "dpmpp_2m")
    assert not np.array_equal(dpm, run("ddim", "--num_steps", "20"))
    assert not np.array_equal(dpm, run("rescaled", "--sampler", "dpmpp_2m", "--guidance_rescale", "0.7"))
    with pytest.raises(SystemExit):
        inference_ldm.main(["--path_to_weights", str(models["text"]), "--prompt", "a", "--guidance_rescale", "2"])


def test_a_replacement_vae_of_the_other_kind_is_refused_though_its_latents_have_the_same_shape(tmp_path):
    import dataclasses

    from src.pipeline import replacement_vae
    from tests.stage2_helpers import TINY_VAE, make_vae_file

    vq = dataclasses.replace(TINY_VAE, quantize=True, vq_embed_dim=TINY_VAE.latent_dim, codebook_size=16)
    assert (vq.latent_dim, vq.downsample_factor) == (TINY_VAE.latent_dim, TINY_VAE.downsample_factor)
    with pytest.raises(PipelineError, match="is a VQ autoencoder, but the model was trained on the latents of a KL"):
        replacement_vae(make_vae_file(tmp_path / "vq.safetensors", vae_cfg=vq), TINY_VAE)
    assert replacement_vae(make_vae_file(tmp_path / "kl.safetensors", seed=3), TINY_VAE).config.quantize is False
