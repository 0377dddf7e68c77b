import os

# Quiet TensorFlow's C++ start-up chatter in test logs; real errors still surface as exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
