"""A user's model file that emits its own FutureWarning (moecc must not silence it)."""
import warnings

import tiny_gpt


def build():
    warnings.warn("my own deprecation notice", FutureWarning)
    return tiny_gpt.build()
