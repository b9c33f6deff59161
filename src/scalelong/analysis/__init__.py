"""Reading finished runs back: the stability report and the multi-seed study."""
