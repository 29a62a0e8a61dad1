"""kvmem.memory: plaintext memory, and which memories a request gets.

index.py (MemoryIndex: lexical + dense scoring fused), lexical.py (BM25), fusion.py (rank fusion), dates.py (dates
a text speaks of), encoder.py + embedding_cache.py (MiniLM embeddings, kept on disk), scheduler.py (MemScheduler:
device / CPU / disk tiers), recall.py (what a cubes="auto" request gets, and in which form).
"""
