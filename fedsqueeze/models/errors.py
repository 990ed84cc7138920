"""The model error every model module raises (its own module, so the zoo and the user-model
loader can both use it without importing each other)."""


class ModelError(ValueError):
    """An unknown model name, or an input shape / class count the model cannot take."""
