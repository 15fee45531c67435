# Training, evaluation and pre-training of one detector run (Lightning).
