"""The bridge daemon; see ``bridge.service`` for the data flow."""
