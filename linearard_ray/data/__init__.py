"""Data: text sources, the embedded corpora, tokenisation into token blocks with Ray Data, the block stream
a worker trains on, and text sampled from the teacher."""
