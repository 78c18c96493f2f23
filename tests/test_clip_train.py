import numpy as np
import pytest

from finetune.clip.clip_model import train_clip, wise_ft
from finetune.clip.config import ClipTrainConfig
from finetune.clip.lit import train_lit
from tasks.catalog.encoders import load_catalog_encoder, model_kind, new_lit_encoder
from tasks.catalog.image_tower import ImageTowerConfig
from tasks.catalog.pairs import build_pairs
from tasks.core.models import ModelNotAvailableError
from tasks.core.products import read_catalog

TINY_TOWER = ImageTowerConfig(image_size=(80, 60), widths=(8, 16), blocks=(1, 1))


@pytest.fixture(scope="module")
def sample_pairs(fashion_sample):
    """The first 48 products of the shipped sample (images decoded)."""
    pairs = build_pairs(read_catalog(fashion_sample / "styles.csv"), show_progress=False)
    return pairs.subset(np.arange(len(pairs)) < 48)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="module")
def minilm_caption_vectors(sample_pairs):
    encoder = new_lit_encoder("all-MiniLM-L6-v2", TINY_TOWER)
    return encoder.encode_text(sample_pairs.captions)


def fast(**overrides) -> ClipTrainConfig:
    settings = dict(
        epochs=10,
        batch_size=16,
        learning_rate=3e-3,
        clip_learning_rate=1e-3,
        warmup_fraction=0.0,
        augment=False,
        wise_ft_ratio=1.0,
        checkpoint_every=1000,
    )
    return ClipTrainConfig(**{**settings, **overrides})


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert set(a) == set(b)
    for key in a:
        assert np.allclose(a[key].float().numpy(), b[key].float().numpy(), atol=1e-6), key


# ------------------------------------------------------------------------------------------- CLIPModel


def test_tiny_clip_loss_falls_and_the_saved_model_gives_the_same_embeddings(
    tiny_clip, sample_pairs, tmp_path
):
    encoder = load_catalog_encoder(tiny_clip)
    assert model_kind(tiny_clip) == "clip-base" and encoder.kind == "clip"
    pixels, captions = sample_pairs.pixels[:16], sample_pairs.captions[:16]
    result = train_clip(encoder, pixels, captions, fast(epochs=12), show_progress=False)
    assert result.steps == 12 and result.device == "cpu" and result.mixed_precision is False  # never on CPU
    assert np.mean(result.losses[-3:]) < result.losses[0] - 0.3
    text, images = encoder.encode_text(captions), encoder.encode_images(pixels)
    saved = encoder.save(tmp_path / "clip-out")
    assert model_kind(saved) == "clip" and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    reloaded = load_catalog_encoder(saved)
    assert np.allclose(reloaded.encode_text(captions), text, atol=1e-5)
    assert np.allclose(reloaded.encode_images(pixels), images, atol=1e-5)
    # images as files give the same vectors as the decoded array
    paths = sample_pairs.table["image"].tolist()[:4]
    assert np.allclose(reloaded.encode_images(paths), images[:4], atol=1e-4)


def test_wise_ft_interpolates_between_zero_shot_and_fine_tuned():
    import torch

    zero = {"w": torch.zeros(3), "ids": torch.tensor([0, 1, 2])}
    tuned = {"w": torch.tensor([2.0, 4.0, -2.0]), "ids": torch.tensor([5, 6, 7])}
    assert torch.equal(wise_ft(zero, tuned, 0.0)["w"], zero["w"])
    assert torch.equal(wise_ft(zero, tuned, 1.0)["w"], tuned["w"])
    assert torch.allclose(wise_ft(zero, tuned, 0.25)["w"], torch.tensor([0.5, 1.0, -0.5]))
    assert torch.equal(wise_ft(zero, tuned, 0.25)["ids"], tuned["ids"])  # integer buffers are not averaged
    with pytest.raises(ValueError, match="same architecture"):
        wise_ft(zero, {"w": tuned["w"]}, 0.5)


def test_wise_ft_ratio_zero_returns_the_zero_shot_model_and_frozen_towers_stay_put(tiny_clip, sample_pairs):
    pixels, captions = sample_pairs.pixels[:16], sample_pairs.captions[:16]
    encoder = load_catalog_encoder(tiny_clip)
    zero_shot = state(encoder.model)
    train_clip(encoder, pixels, captions, fast(epochs=3, wise_ft_ratio=0.0), show_progress=False)
    assert_same_state(state(encoder.model), zero_shot)

    encoder = load_catalog_encoder(tiny_clip)
    train_clip(encoder, pixels, captions, fast(epochs=3, freeze_text=True), show_progress=False)
    after = state(encoder.model)
    text_keys = [k for k in after if k.startswith(("text_model.", "text_projection."))]
    vision_keys = [
        k for k in after if k.startswith(("vision_model.", "visual_projection.")) and "position_ids" not in k
    ]
    assert text_keys and vision_keys
    assert all(np.array_equal(after[k].numpy(), zero_shot[k].numpy()) for k in text_keys)
    assert any(not np.allclose(after[k].numpy(), zero_shot[k].numpy()) for k in vision_keys)
    with pytest.raises(ValueError, match="both towers are frozen"):
        train_clip(encoder, pixels, captions, fast(freeze_text=True, freeze_image=True), show_progress=False)


# ---------------------------------------------------------------------------------- locked text (LiT)


def test_locked_text_loss_falls_and_the_saved_model_reloads_in_the_text_index_space(
    sample_pairs, minilm_caption_vectors, tmp_path
):
    from tasks.core.models import load_sentence_transformer

    encoder = new_lit_encoder("all-MiniLM-L6-v2", TINY_TOWER, seed=1)
    assert encoder.embedding_dim == 384  # the tower's output follows the text tower
    result = train_lit(
        encoder,
        sample_pairs.pixels,
        minilm_caption_vectors,
        fast(epochs=12, augment=True, learning_rate=1e-2),
        captions=sample_pairs.captions,
        show_progress=False,
    )
    assert result.steps == 12 * 3
    by_epoch = result.loss_by_epoch()
    assert by_epoch[0] > 2.5 and by_epoch[-1] < 0.75 * by_epoch[0]  # from chance (ln 16 = 2.77) down
    images = encoder.encode_images(sample_pairs.pixels)
    assert np.allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    saved = encoder.save(tmp_path / "lit")
    assert model_kind(saved) == "lit" and (saved / "text" / "modules.json").is_file()
    reloaded = load_catalog_encoder(saved)
    assert np.allclose(reloaded.encode_images(sample_pairs.pixels), images, atol=1e-5)
    assert np.allclose(
        reloaded.encode_images(sample_pairs.table["image"].tolist()[:5]), images[:5], atol=1e-5
    )
    # text vectors are exactly those of the text index's model
    queries = ["navy blue men shirt", "black watch"]
    index_model = load_sentence_transformer("all-MiniLM-L6-v2", max_seq_length=64)
    expected = index_model.encode(queries, normalize_embeddings=True)
    assert np.allclose(reloaded.encode_text(queries), expected, atol=1e-5)
    assert reloaded.text_fingerprint == encoder.text_fingerprint


def test_identical_captions_are_not_each_others_negatives():
    import torch

    from finetune.clip.loop import caption_groups, contrastive_targets

    groups = torch.from_numpy(caption_groups(["a", "b", "a", "c"]))
    targets = contrastive_targets(groups)
    assert torch.allclose(targets[0], torch.tensor([0.5, 0.0, 0.5, 0.0]))
    assert torch.allclose(targets[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_cluster_batches_hold_similar_products_and_cover_every_product_once(
    minilm_caption_vectors, sample_pairs
):
    from finetune.clip.loop import caption_clusters, epoch_order

    clusters = caption_clusters(minilm_caption_vectors, 6, seed=0)
    assert np.array_equal(clusters, caption_clusters(minilm_caption_vectors, 6, seed=0))  # seeded
    assert len(set(clusters.tolist())) == 6
    order = epoch_order(len(clusters), 0, 0, clusters, chunk=4)
    assert sorted(order.tolist()) == list(range(len(clusters)))
    assert np.array_equal(
        order, epoch_order(len(clusters), 0, 0, clusters, chunk=4)
    )  # same epoch, same batches
    assert not np.array_equal(order, epoch_order(len(clusters), 0, 1, clusters, chunk=4))

    def clusters_per_batch(visit):
        return np.mean([len(set(clusters[visit[i : i + 8]].tolist())) for i in range(0, len(visit) - 7, 8)])

    assert clusters_per_batch(order) < clusters_per_batch(epoch_order(len(clusters), 0, 0)) - 1
    # clusters follow the captions: products of one cluster share fewer article types than random groups
    kinds = np.array([a["articleType"] for a in sample_pairs.attributes()])
    shuffled = np.random.default_rng(0).permutation(clusters)
    assert sum(len(set(kinds[clusters == k])) for k in range(6)) < sum(
        len(set(kinds[shuffled == k])) for k in range(6)
    )


def test_training_resumes_from_its_checkpoint_exactly(sample_pairs, minilm_caption_vectors, tmp_path):
    config = fast(epochs=2, augment=True, checkpoint_every=1)  # 6 steps, augmentations on

    straight = new_lit_encoder("all-MiniLM-L6-v2", TINY_TOWER, seed=3)
    expected = train_lit(
        straight,
        sample_pairs.pixels,
        minilm_caption_vectors,
        config,
        run_key="run",
        checkpoint_dir=tmp_path / "a",
        show_progress=False,
    )

    class Crash(Exception):
        pass

    def crash_at_step_4(step, loss):
        if step == 4:
            raise Crash

    interrupted = new_lit_encoder("all-MiniLM-L6-v2", TINY_TOWER, seed=3)
    with pytest.raises(Crash):
        train_lit(
            interrupted,
            sample_pairs.pixels,
            minilm_caption_vectors,
            config,
            run_key="run",
            checkpoint_dir=tmp_path / "b",
            show_progress=False,
            on_step=crash_at_step_4,
        )
    resumed_encoder = new_lit_encoder("all-MiniLM-L6-v2", TINY_TOWER, seed=3)
    resumed = train_lit(
        resumed_encoder,
        sample_pairs.pixels,
        minilm_caption_vectors,
        config,
        run_key="run",
        checkpoint_dir=tmp_path / "b",
        show_progress=False,
    )
    assert resumed.resumed_from_step == 4 and resumed.steps == expected.steps == 6
    assert np.allclose(resumed.losses, expected.losses, atol=1e-5)
    assert_same_state(state(resumed_encoder.tower), state(straight.tower))
    # a checkpoint of other settings is not resumed from
    other = train_lit(
        new_lit_encoder("all-MiniLM-L6-v2", TINY_TOWER, seed=3),
        sample_pairs.pixels,
        minilm_caption_vectors,
        config,
        run_key="another-run",
        checkpoint_dir=tmp_path / "b",
        show_progress=False,
    )
    assert other.resumed_from_step == 0


def test_time_budget_stops_training_and_a_rerun_resumes_it(sample_pairs, minilm_caption_vectors, tmp_path):
    from finetune.clip.loop import epochs_that_fit

    assert epochs_that_fit(16, 1, 60.0, 60.0, 40 * 60.0) == 16
    assert epochs_that_fit(16, 1, 300.0, 300.0, 40 * 60.0) == 8
    assert epochs_that_fit(16, 1, 3000.0, 3000.0, 40 * 60.0) == 1
    # after a slow first epoch (300 s) and a faster second (100 s): 2 + 1800 s / 100 s
    assert epochs_that_fit(40, 2, 400.0, 100.0, 40 * 60.0) == 22
    assert epochs_that_fit(16, 2, 400.0, 100.0, 40 * 60.0) == 16
    tight = fast(epochs=4, max_train_minutes=1e-5)
    encoder = new_lit_encoder("all-MiniLM-L6-v2", TINY_TOWER)
    stopped = train_lit(
        encoder,
        sample_pairs.pixels,
        minilm_caption_vectors,
        tight,
        run_key="budget",
        checkpoint_dir=tmp_path,
        show_progress=False,
    )
    assert stopped.stopped_by_budget and stopped.steps == 1 and (tmp_path / "checkpoint.pt").is_file()
    finished = train_lit(
        new_lit_encoder("all-MiniLM-L6-v2", TINY_TOWER),
        sample_pairs.pixels,
        minilm_caption_vectors,
        fast(epochs=4),
        run_key="budget",
        checkpoint_dir=tmp_path,
        show_progress=False,
    )
    assert finished.resumed_from_step == 1 and finished.steps == 12 and not finished.stopped_by_budget


def test_the_budget_replans_at_the_second_epochs_pace(sample_pairs, minilm_caption_vectors, monkeypatch):
    """A slow first epoch cuts the plan; the faster second one lets it grow back to what fits."""
    import finetune.clip.loop as clip_loop

    clock = {"now": 0.0}

    class FakeTime:  # the loop's clock, advanced by the steps below instead of by real time
        @staticmethod
        def time():
            return clock["now"]

        @staticmethod
        def process_time():
            return clock["now"]

    def tick(step: int, loss: float) -> None:
        # the loop reads the clock before calling on_step: step k's time counts from step k + 1 on,
        # so the first epoch (steps 1-3) is timed at 2 x 100 s and the second at 3 x 10 s
        clock["now"] += 100.0 if step <= 2 else 10.0

    monkeypatch.setattr(clip_loop, "time", FakeTime)
    result = train_lit(
        new_lit_encoder("all-MiniLM-L6-v2", TINY_TOWER),
        sample_pairs.pixels,
        minilm_caption_vectors,
        fast(epochs=20, max_train_minutes=10.0),
        run_key="replan",
        show_progress=False,
        on_step=tick,
    )
    assert result.steps_per_epoch == 3
    # after epoch 1: 600 s // 200 s = 3 epochs; after epoch 2 (230 s): 2 + 370 s // 30 s = 14
    assert result.epochs_planned == 14 and result.steps == 42 and not result.stopped_by_budget
    assert [(r["after_epochs"], r["epochs"]) for r in result.replans] == [(1, 3), (2, 14)]


def test_a_text_model_is_not_an_image_encoder():
    assert model_kind("all-MiniLM-L6-v2") == "text"
    with pytest.raises(ModelNotAvailableError, match="adapt clip --catalog PATH --model all-MiniLM-L6-v2"):
        load_catalog_encoder("all-MiniLM-L6-v2")
