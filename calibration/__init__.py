"""Sample data, activation statistics and Q/DQ emission for INT8; imports runtime/."""
