"""Input: corpora, the byte tokenizer, packed sequences and the elastic distributed sampler."""
from plait.data.corpus import builtin_corpus, load_text
from plait.data.dataset import TokenDataset, load_token_splits
from plait.data.sampler import ElasticSampler
from plait.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "ElasticSampler", "TokenDataset", "builtin_corpus", "load_text",
           "load_token_splits"]
