"""Audio in: decoding any file or tar member, resampling, the Kaldi log-mel front end, its statistics."""
