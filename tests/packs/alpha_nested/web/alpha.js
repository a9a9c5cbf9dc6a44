// served by Kiln's server under /extensions/alpha_nested/
