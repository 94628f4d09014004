"""The error lightning-sae raises for settings that cannot work together in a run."""


class ConfigurationError(ValueError):
    """Settings that contradict the run they are used in, found when the run starts.

    Raised where a setting is checked against the run (``max_steps``, the data's size) rather than
    where it was given, e.g. by ``Trainer.fit``'s set-up hooks. The command line reports it like a
    bad option: the message and exit status 2, no traceback.
    """
