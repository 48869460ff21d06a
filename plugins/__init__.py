"""Built-in trainbus plugins; each runs in its own process like any third-party plugin."""
