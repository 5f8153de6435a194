"""Configuration: options declared once (`options`), named presets (`presets`), defaults derived from the data
(`defaults`), and the checks of a resolved configuration (`validate`)."""
