"""Named optimization presets (TOML files beside this one), shipped as package data."""
