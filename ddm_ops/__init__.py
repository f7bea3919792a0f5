"""The DDM method as a library: data, models, training, clustering, reverse gradient matching, removal, attribution."""
