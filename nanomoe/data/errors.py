"""The one error the data modules raise: the message says what to change."""


class DataError(ValueError):
    """A data folder, corpus or loader setting is unusable; the message says what to do."""
